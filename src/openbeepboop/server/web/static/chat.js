// The Chat page. It talks to the public API with the session cookie and the CSRF header
// (OBB.api, app.js), like any other client:
// - streaming on:  POST /v1/chat/completions {stream: true}, the SSE body read as it comes;
// - streaming off: the same call without stream, the answer shown whole;
// - as a job:      POST /v1/jobs, then its events live from GET /v1/jobs/{id}/events.
// Stop aborts the request (or closes the event stream) and cancels the job.
// Answers are Markdown (marked), cleaned by DOMPurify before they reach the page.
(function () {
  "use strict";

  var el = {};
  var turns = []; // the conversation so far: {role, content}, sent with each message
  var run = null; // the answer being written, while it is
  var md = null; // our Marked instance

  // -- Markdown, always sanitized -------------------------------------------------

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  function setupMarkdown() {
    md = new window.marked.Marked({ gfm: true, breaks: true, async: false });
    md.use({
      renderer: {
        // HTML written by the model is shown as text, never made into elements
        html: function (token) { return escapeHtml(token.text); },
        // images would load from anywhere: a link to them instead
        image: function (token) {
          return '<a href="' + escapeHtml(token.href) + '">' +
            escapeHtml(token.text || token.href) + "</a>";
        },
      },
    });
    window.DOMPurify.addHook("afterSanitizeAttributes", function (node) {
      if (node.tagName === "A" && node.hasAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer");
      }
    });
  }

  function renderMarkdown(box, text) {
    var html = md.parse(text);
    box.innerHTML = window.DOMPurify.sanitize(html, {
      FORBID_TAGS: ["img", "style", "form", "button", "textarea", "select", "video", "audio"],
      FORBID_ATTR: ["style"],
    });
  }

  // -- the conversation's elements ------------------------------------------------

  function make(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 120;
  }

  function followBottom(wasNear) {
    if (wasNear) window.scrollTo(0, document.body.scrollHeight);
  }

  // One exchange on the page: the user's message and the answer being written.
  function Turn(prompt, model) {
    var near = nearBottom();
    this.prompt = prompt;
    this.text = "";
    this.queued = false;
    this.user = make("div", "msg user");
    this.user.appendChild(make("span", "who", "You"));
    this.user.appendChild(make("p", "text", prompt));
    this.bot = make("div", "msg assistant");
    this.bot.setAttribute("aria-busy", "true");
    this.bot.appendChild(make("span", "who", model));
    this.answer = this.bot.appendChild(make("div", "answer"));
    this.meta = this.bot.appendChild(make("small", "meta"));
    el.log.appendChild(this.user);
    el.log.appendChild(this.bot);
    el.empty.hidden = true;
    followBottom(near);
  }

  Turn.prototype.add = function (piece) {
    if (!piece) return;
    this.text += piece;
    if (this.queued) return;
    this.queued = true; // re-render at most once a frame, however fast pieces come
    var self = this;
    window.requestAnimationFrame(function () {
      self.queued = false;
      self.render();
    });
  };

  Turn.prototype.set = function (text) {
    this.text = text || "";
    this.render();
  };

  Turn.prototype.render = function () {
    var near = nearBottom();
    renderMarkdown(this.answer, this.text);
    followBottom(near);
  };

  Turn.prototype.jobLink = function (jobId) {
    if (!jobId || this.link) return;
    this.link = make("a", "job", jobId);
    this.link.href = "/jobs/" + encodeURIComponent(jobId);
    this.meta.appendChild(document.createTextNode("job "));
    this.meta.appendChild(this.link);
    this.note = this.meta.appendChild(make("span", "note"));
  };

  Turn.prototype.say = function (text, className) {
    if (!this.note) this.note = this.meta.appendChild(make("span", "note"));
    this.note.textContent = (this.link ? " · " : "") + text;
    this.note.className = "note" + (className ? " " + className : "");
  };

  Turn.prototype.event = function (text) {
    if (!this.events) this.events = this.bot.appendChild(make("ol", "events"));
    this.events.appendChild(make("li", "", text));
  };

  Turn.prototype.done = function () {
    this.render();
    this.bot.removeAttribute("aria-busy");
  };

  // -- talking to the API ---------------------------------------------------------

  function ApiError(message) {
    this.message = message;
  }

  async function apiError(response) {
    var message = "HTTP " + response.status;
    try {
      var body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (e) {
      // not JSON: keep the status
    }
    if (response.status === 401) message += " (the session has ended: reload the page to log in again)";
    return new ApiError(message);
  }

  // The data of each server-sent event of a fetch body, as it arrives; stops at [DONE].
  async function readEvents(stream, onData) {
    var reader = stream.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    for (;;) {
      var read = await reader.read();
      if (read.done) throw new ApiError("the stream ended before the answer did");
      buffer += decoder.decode(read.value, { stream: true });
      var blocks = buffer.split(/\r?\n\r?\n/);
      buffer = blocks.pop();
      for (var i = 0; i < blocks.length; i++) {
        var data = blocks[i].split(/\r?\n/)
          .filter(function (line) { return line.indexOf("data:") === 0; })
          .map(function (line) { return line.slice(5).replace(/^ /, ""); })
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") {
          reader.cancel().catch(function () {});
          return;
        }
        onData(JSON.parse(data));
      }
    }
  }

  function usageNote(usage, started) {
    var parts = [];
    if (usage && usage.completion_tokens !== undefined) parts.push(usage.completion_tokens + " tokens");
    parts.push(((Date.now() - started) / 1000).toFixed(1) + " s");
    return parts.join(" · ");
  }

  async function streamed(r, body) {
    body.stream = true;
    body.stream_options = { include_usage: true };
    var response = await OBB.api("/v1/chat/completions", {
      method: "POST", json: body, signal: r.abort.signal,
    });
    r.job(response.headers.get("x-openbeepboop-job-id"));
    if (!response.ok) throw await apiError(response);
    status("Streaming the answer…");
    var usage = null;
    await readEvents(response.body, function (chunk) {
      if (chunk.error) throw new ApiError(chunk.error.message || "the job failed");
      if (chunk.usage) usage = chunk.usage;
      var choice = (chunk.choices || [])[0];
      if (choice && choice.index === 0 && choice.delta) r.turn.add(choice.delta.content);
    });
    r.turn.say(usageNote(usage, r.started));
  }

  async function whole(r, body) {
    var response = await OBB.api("/v1/chat/completions", {
      method: "POST", json: body, signal: r.abort.signal,
    });
    r.job(response.headers.get("x-openbeepboop-job-id"));
    if (!response.ok) throw await apiError(response);
    var answer = await response.json();
    var choice = (answer.choices || [])[0] || {};
    r.turn.set((choice.message && choice.message.content) || "");
    r.turn.say(usageNote(answer.usage, r.started));
  }

  async function asJob(r, body) {
    var spec = { endpoint: "/v1/chat/completions", body: body };
    var response = await OBB.api("/v1/jobs", { method: "POST", json: spec, signal: r.abort.signal });
    if (!response.ok) throw await apiError(response);
    var job = await response.json();
    r.job(job.id);
    r.turn.event(job.status === "queued" ? "queued, position " + job.queue_position : job.status);
    r.sawQueued = true;
    status("Job " + job.id + " submitted; following its events…");
    await followEvents(r, job.id);
  }

  // The job's events (GET /v1/jobs/{id}/events) until it ends. EventSource sends the
  // cookie and, if the connection drops, reconnects with Last-Event-ID to resume.
  function followEvents(r, jobId) {
    return new Promise(function (resolve, reject) {
      var source = new EventSource("/v1/jobs/" + encodeURIComponent(jobId) + "/events");
      var finish = function (error) {
        source.close();
        r.closeEvents = null;
        if (error) reject(error); else resolve();
      };
      r.closeEvents = function () { finish(null); };
      source.onmessage = function (message) {
        if (message.data === "[DONE]") return finish(null);
        var event = JSON.parse(message.data);
        if (event.error) return finish(new ApiError(event.error.message));
        var failure = onJobEvent(r, event);
        if (failure) finish(failure);
      };
      source.onerror = function () {
        if (source.readyState === EventSource.CLOSED) {
          finish(new ApiError("could not follow the job's events (is it still yours?)"));
        } else {
          status("The event stream dropped; reconnecting…");
        }
      };
    });
  }

  // Shows one job event; an ApiError when the job failed.
  function onJobEvent(r, event) {
    var turn = r.turn;
    switch (event.type) {
      case "queued":
        if (!r.sawQueued) turn.event("queued, position " + event.position +
          (event.waiting_for ? " (waiting for a node that may run it)" : ""));
        status("Queued, position " + event.position + "…");
        break;
      case "started":
        turn.event("started on " + (event.node_id || "a node"));
        status("Running on " + (event.node_id || "a node") + "…");
        break;
      case "downloading":
      case "loading":
        status(event.type + " the model, " + Math.round(100 * (event.fraction || 0)) + " %…");
        break;
      case "token":
        turn.add(event.t);
        break;
      case "end":
        turn.event("end: " + event.tokens_out + " tokens in " + event.decode_time_ms +
          " ms (" + event.stop_reason + ")");
        turn.say(event.tokens_out + " tokens · " + ((Date.now() - r.started) / 1000).toFixed(1) + " s");
        break;
      case "cancelled":
        turn.event("cancelled");
        turn.say("the job was cancelled", "warn");
        r.cancelled = true;
        break;
      case "failed":
        turn.event("failed: " + event.code);
        return new ApiError(event.message || "the job failed");
    }
    return null;
  }

  // -- one exchange, start to end -------------------------------------------------

  function Run(turn) {
    this.turn = turn;
    this.abort = new AbortController();
    this.jobId = null;
    this.customId = "chat-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 10);
    this.started = Date.now();
    this.stopped = false;
    this.cancelled = false;
    this.closeEvents = null;
    this.sawQueued = false;
  }

  Run.prototype.job = function (jobId) {
    if (jobId && !this.jobId) {
      this.jobId = jobId;
      this.turn.jobLink(jobId);
    }
  };

  // Cancel the job: by its id, or (an answer asked for whole has not said it yet)
  // found among the newest jobs by the custom_id we gave it.
  Run.prototype.cancel = async function () {
    var id = this.jobId;
    if (!id) {
      var list = await OBB.api("/v1/jobs?limit=50");
      if (!list.ok) throw await apiError(list);
      var mine = ((await list.json()).data || []).filter(function (j) {
        return j.custom_id === this.customId;
      }, this)[0];
      if (!mine) return "stopped before the job was queued";
      id = mine.id;
      this.job(id);
    }
    var response = await OBB.api("/v1/jobs/" + encodeURIComponent(id) + "/cancel", { method: "POST" });
    if (!response.ok) throw await apiError(response);
    var job = await response.json();
    if (job.status === "cancelled") return "stopped: the job was cancelled";
    return "stopped; the job had already ended (" + job.status + ")";
  };

  function requestBody(settings, prompt, customId) {
    var messages = [];
    if (settings.system) messages.push({ role: "system", content: settings.system });
    messages = messages.concat(turns, [{ role: "user", content: prompt }]);
    var body = { model: settings.model, messages: messages };
    if (settings.maxTokens !== null) body.max_tokens = settings.maxTokens;
    if (settings.temperature !== null) body.temperature = settings.temperature;
    body.custom_id = customId;
    body.metadata = { source: "web chat" };
    return body;
  }

  // The settings, or null (with the reason shown) when one is not usable.
  function readSettings() {
    var model = el.model.value;
    if (!model) return fail("Pick a model first (none is served? start a node, then reload the list).");
    if (!el.maxTokens.checkValidity()) return fail("Max tokens: a whole number from 1, or empty for the model's default.");
    if (!el.temperature.checkValidity()) return fail("Temperature: a number from 0 to 2, or empty for the model's default.");
    return {
      model: model,
      system: el.system.value.trim(),
      maxTokens: el.maxTokens.value === "" ? null : parseInt(el.maxTokens.value, 10),
      temperature: el.temperature.value === "" ? null : parseFloat(el.temperature.value),
    };
  }

  function fail(message) {
    showError(message);
    return null;
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.error.hidden = true;
  }

  function status(text) {
    el.status.textContent = text;
  }

  function busy(on) {
    el.send.disabled = on;
    el.send.setAttribute("aria-busy", on ? "true" : "false");
    el.stop.disabled = !on;
  }

  async function send() {
    if (run) return;
    clearError();
    var prompt = el.prompt.value;
    if (!prompt.trim()) return el.prompt.focus();
    var settings = readSettings();
    if (!settings) return;
    var turn = new Turn(prompt, settings.model);
    var r = (run = new Run(turn));
    var body = requestBody(settings, prompt, r.customId);
    var mode = el.asJob.checked ? asJob : el.stream.checked ? streamed : whole;
    el.prompt.value = "";
    busy(true);
    status(mode === whole ? "Waiting for the whole answer…" : "Sending…");
    try {
      await mode(r, body);
      if (r.stopped) return;
      turns.push({ role: "user", content: prompt }, { role: "assistant", content: turn.text });
      status(r.cancelled ? "The job was cancelled." : "Answered.");
    } catch (error) {
      if (r.stopped) return;
      failed(turn, error);
    } finally {
      if (!r.stopped) end(r);
    }
  }

  function failed(turn, error) {
    var message = error instanceof ApiError ? error.message : "the request failed: " + error;
    turn.say(message, "error");
    turn.bot.classList.add("excluded");
    turn.user.classList.add("excluded");
    showError(message + " (this turn is left out of the conversation)");
    if (!el.prompt.value) el.prompt.value = turn.prompt;
    status("");
  }

  function end(r) {
    r.turn.done();
    if (run === r) run = null;
    busy(false);
    el.prompt.focus();
  }

  async function stop() {
    var r = run;
    if (!r || r.stopped) return;
    r.stopped = true;
    r.abort.abort();
    if (r.closeEvents) r.closeEvents();
    status("Stopping…");
    var said;
    try {
      said = await r.cancel();
    } catch (error) {
      said = "stopped, but the job could not be cancelled: " + (error.message || error);
    }
    r.turn.say(said, "warn");
    if (r.turn.text) {
      turns.push({ role: "user", content: r.turn.prompt }, { role: "assistant", content: r.turn.text });
    }
    status("Stopped.");
    end(r);
  }

  async function newChat() {
    if (run) await stop();
    turns = [];
    el.log.textContent = "";
    el.empty.hidden = false;
    clearError();
    status("");
    el.prompt.focus();
  }

  // -- models ---------------------------------------------------------------------

  async function loadModels() {
    var chosen = el.model.value || localStorage.getItem("obb.chat.model") || "";
    el.modelsNote.textContent = "Loading the served models…";
    var names = [];
    try {
      var response = await OBB.api("/v1/models");
      if (!response.ok) throw await apiError(response);
      names = ((await response.json()).data || []).map(function (m) { return m.id; });
    } catch (error) {
      el.modelsNote.textContent = "Could not list the models: " + (error.message || error);
      return;
    }
    el.model.textContent = "";
    if (!names.length) {
      el.model.appendChild(new Option("No model is served right now", ""));
      el.modelsNote.textContent = "No live node serves a model: start a node, then reload the list (↻).";
      return;
    }
    names.forEach(function (name) {
      el.model.appendChild(new Option(name, name, false, name === chosen));
    });
    el.modelsNote.textContent = names.length + (names.length === 1 ? " model" : " models") + " served by live nodes.";
  }

  // -- wiring ---------------------------------------------------------------------

  function asJobChanged() {
    el.stream.disabled = el.asJob.checked; // a job's events always stream
  }

  document.addEventListener("DOMContentLoaded", function () {
    ["model", "system", "stream", "log", "empty", "error", "status", "prompt", "send", "stop"]
      .forEach(function (name) { el[name] = document.getElementById("chat-" + name); });
    el.maxTokens = document.getElementById("chat-max-tokens");
    el.temperature = document.getElementById("chat-temperature");
    el.asJob = document.getElementById("chat-as-job");
    el.modelsNote = document.getElementById("chat-models-note");
    setupMarkdown();
    document.getElementById("chat-form").addEventListener("submit", function (e) {
      e.preventDefault();
      send();
    });
    document.getElementById("chat-settings").addEventListener("submit", function (e) {
      e.preventDefault();
    });
    el.prompt.addEventListener("keydown", function (e) {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        send();
      }
    });
    el.stop.addEventListener("click", stop);
    document.getElementById("chat-new").addEventListener("click", newChat);
    document.getElementById("chat-models-reload").addEventListener("click", loadModels);
    el.model.addEventListener("change", function () {
      localStorage.setItem("obb.chat.model", el.model.value);
    });
    el.asJob.addEventListener("change", asJobChanged);
    asJobChanged();
    loadModels();
  });
})();

// The job page: while the job is not final, follow its events (GET /v1/jobs/{id}/events,
// SSE with the session cookie): the status, the queue position and the answer piece by
// piece; at its end, swap in the job's final state from the server (no reload).
(function () {
  "use strict";
  var following = null;

  function follow(box) {
    var id = box.getAttribute("data-live");
    if (!id || following === id) return;
    following = id;
    var status = document.getElementById("job-status");
    var note = document.getElementById("job-note");
    var answer = document.getElementById("job-answer");
    var text = "";
    var done = false;
    var source = new EventSource("/v1/jobs/" + encodeURIComponent(id) + "/events");

    function setStatus(value) {
      status.textContent = value;
      status.className = "status status-" + value;
    }
    function showStarted(ev) {
      var cell = document.querySelector("#job-timings tr[data-step=started] td");
      if (cell && ev.started_at) {
        cell.textContent = new Date(ev.started_at * 1000).toISOString().slice(0, 19).replace("T", " ") + "Z";
      }
      var node = document.getElementById("job-node");
      if (node && ev.node_id && node.textContent.trim() === "none yet") node.textContent = ev.node_id;
    }
    function startsIn(ev) {  // the estimate (docs/scheduling.md "Position and ETA")
      if (typeof ev.estimated_start_at !== "number") return "";
      var s = Math.max(0, ev.estimated_start_at - Date.now() / 1000);
      var shown = s < 1 ? Math.round(s * 1000) + " ms" : s < 60 ? s.toFixed(1) + " s"
        : s < 3600 ? Math.floor(s / 60) + " min " + String(Math.floor(s % 60)).padStart(2, "0") + " s"
        : Math.floor(s / 3600) + " h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + " min";
      return ", starts in about " + shown;
    }
    function finish() {
      if (done) return;
      done = true;
      source.close();
      following = null;
      window.htmx.ajax("GET", window.location.pathname, {
        target: "#job-detail", select: "#job-detail", swap: "outerHTML"
      });
    }
    source.onmessage = function (e) {
      if (e.data === "[DONE]") { finish(); return; }
      var ev;
      try { ev = JSON.parse(e.data); } catch (_) { return; }
      if (ev.type === "queued") {
        var ahead = ev.position;
        note.textContent = ahead === null || ahead === undefined ? "queued"
          : ahead + (ahead === 1 ? " job" : " jobs") + " ahead in the queue" + startsIn(ev);
      } else if (ev.type === "started") {
        setStatus("in_progress");
        note.textContent = "running";
        showStarted(ev);
      } else if (ev.type === "token") {
        text += ev.t;
        answer.textContent = text;
      } else if (ev.type === "end" || ev.type === "failed" || ev.type === "cancelled") {
        finish();
      }
    };
    source.onerror = function () {
      // the browser reconnects by itself (resuming after the last event) unless closed
      if (source.readyState === EventSource.CLOSED) finish();
    };
  }

  function start() {
    var box = document.querySelector("#job-detail[data-live]");
    if (box) follow(box);
  }
  document.addEventListener("DOMContentLoaded", start);
  document.addEventListener("htmx:afterSettle", start);
})();

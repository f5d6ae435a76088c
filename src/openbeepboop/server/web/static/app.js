// OpenBeepBoop's shared page script (no inline scripts: the pages' CSP forbids them).
// - every htmx request carries the session's CSRF token;
// - elements with data-ts (epoch seconds) show "12 s ago", kept current;
// - OBB.api(path, options) calls the API with the session cookie and the CSRF token.
(function () {
  "use strict";
  function csrf() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }
  function ago(ts) {
    var s = Math.max(0, Date.now() / 1000 - ts);
    if (s >= 86400) return Math.floor(s / 86400) + " d ago";
    if (s >= 3600) return Math.floor(s / 3600) + " h ago";
    if (s >= 60) return Math.floor(s / 60) + " min ago";
    return Math.floor(s) + " s ago";
  }
  function refreshAges(root) {
    (root || document).querySelectorAll("[data-ts]").forEach(function (el) {
      var ts = parseFloat(el.getAttribute("data-ts"));
      if (!isNaN(ts)) el.textContent = ago(ts);
    });
  }
  function api(path, options) {
    options = options || {};
    var headers = Object.assign({ "X-CSRF-Token": csrf() }, options.headers || {});
    if (options.json !== undefined) {
      headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(options.json);
    }
    return fetch(path, Object.assign({}, options, { headers: headers, credentials: "same-origin" }));
  }
  window.OBB = { csrf: csrf, ago: ago, refreshAges: refreshAges, api: api };
  document.addEventListener("htmx:configRequest", function (e) {
    e.detail.headers["X-CSRF-Token"] = csrf();
  });
  document.addEventListener("htmx:afterSwap", function (e) { refreshAges(e.target); });
  document.addEventListener("DOMContentLoaded", function () {
    refreshAges();
    setInterval(refreshAges, 1000);
  });
})();

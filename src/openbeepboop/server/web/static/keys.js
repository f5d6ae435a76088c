// The Keys page: copy a new key's secret; once it is shown, the address becomes /keys
// again (a reload then asks for the page, not to post the form again: the secret is
// gone, as promised, and no second key is made).
(function () {
  "use strict";

  function copied(status, text) {
    status.textContent = text;
  }

  function copy(button) {
    var input = document.getElementById(button.getAttribute("data-copy"));
    var status = document.getElementById("copy-status");
    var fallback = function () {
      input.focus();
      input.select();
      var ok = false;
      try {
        ok = document.execCommand("copy");
      } catch (e) {
        ok = false;
      }
      copied(status, ok ? "Copied." : "Selected: press Ctrl+C (⌘C) to copy.");
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(input.value).then(function () {
        copied(status, "Copied.");
      }, fallback);
    } else {
      fallback();
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var button = document.getElementById("copy-key");
    if (button) {
      button.addEventListener("click", function () { copy(button); });
      document.getElementById("new-key-secret").addEventListener("focus", function (e) {
        e.target.select();
      });
    }
    if (button || /[?&]revoked=/.test(location.search)) {
      history.replaceState(null, "", "/keys");
    }
  });
})();

// vhost-conformance matrix.html: show only the rows where the back-ends disagree. No network.
(function () {
  "use strict";
  var toggle = document.getElementById("only-differs");
  var rows = Array.prototype.slice.call(document.querySelectorAll("table.matrix tr[data-case]"));
  var families = Array.prototype.slice.call(document.querySelectorAll("table.matrix tr.family"));
  var shown = document.getElementById("shown-count");
  function apply() {
    var only = toggle.checked;
    var n = 0;
    rows.forEach(function (r) {
      var ok = !only || r.classList.contains("differs");
      r.hidden = !ok;
      if (ok) { n += 1; }
    });
    // A family heading stays only while one of its rows is shown.
    families.forEach(function (f) {
      var any = false;
      for (var r = f.nextElementSibling; r && !r.classList.contains("family"); r = r.nextElementSibling) {
        if (!r.hidden) { any = true; }
      }
      f.hidden = !any;
    });
    shown.textContent = n + " of " + rows.length + " cases shown";
  }
  toggle.addEventListener("change", apply);
  apply();
  document.body.dataset.ready = "true";
}());

// vhost-conformance report.html: filters by verdict, family, level and text. No network, no eval.
(function () {
  "use strict";
  var cases = Array.prototype.slice.call(document.querySelectorAll("tbody.case"));
  var buttons = Array.prototype.slice.call(document.querySelectorAll("button[data-filter-verdict]"));
  var family = document.getElementById("filter-family");
  var level = document.getElementById("filter-level");
  var text = document.getElementById("filter-text");
  var shown = document.getElementById("shown-count");
  var problems = ["fail", "non-strict", "hang", "crash", "disconnect", "flaky", "error", "xpass"];
  var selected = new Set();

  function apply() {
    var fam = family.value, lev = level.value, q = text.value.trim().toLowerCase();
    var n = 0;
    cases.forEach(function (c) {
      var ok = (selected.size === 0 || selected.has(c.dataset.verdict)) &&
        (fam === "" || c.dataset.family === fam) &&
        (lev === "" || c.dataset.level === lev) &&
        (q === "" || c.dataset.search.indexOf(q) !== -1);
      c.hidden = !ok;
      if (ok) { n += 1; }
    });
    buttons.forEach(function (b) {
      var v = b.dataset.filterVerdict;
      var on = v === "" ? selected.size === 0 :
        v === "problems" ? problems.every(function (p) { return selected.has(p); }) : selected.has(v);
      b.setAttribute("aria-pressed", on ? "true" : "false");
    });
    shown.textContent = n + " of " + cases.length + " cases shown";
  }

  buttons.forEach(function (b) {
    b.addEventListener("click", function () {
      var v = b.dataset.filterVerdict;
      if (v === "") {
        selected.clear();
      } else if (v === "problems") {
        selected.clear();
        problems.forEach(function (p) { selected.add(p); });
      } else if (selected.has(v)) {
        selected.delete(v);
      } else {
        selected.add(v);
      }
      apply();
    });
  });
  family.addEventListener("change", apply);
  level.addEventListener("change", apply);
  text.addEventListener("input", apply);
  function openAll(open) {
    document.querySelectorAll("details.trace, details.log").forEach(function (d) { d.open = open; });
  }
  document.getElementById("expand-all").addEventListener("click", function () { openAll(true); });
  document.getElementById("collapse-all").addEventListener("click", function () { openAll(false); });
  apply();
  document.body.dataset.ready = "true";
}());

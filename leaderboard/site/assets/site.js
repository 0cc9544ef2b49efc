// adt-ft leaderboard site: click a column header to sort, type to filter. No library, no network.
(function () {
  "use strict";

  function cellKey(row, col, numeric) {
    var cell = row.cells[col];
    if (!cell) return numeric ? -Infinity : "";
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    if (!numeric) return raw.toLowerCase();
    var v = parseFloat(raw);
    return isNaN(v) ? -Infinity : v;  // a missing number sorts below every real one
  }

  function sortBy(table, th) {
    var headers = table.tHead.rows[0].cells;
    var col = Array.prototype.indexOf.call(headers, th);
    var numeric = th.getAttribute("data-type") === "num";
    // Numbers start from the largest (the leaderboard's own order), text from A.
    var current = th.getAttribute("aria-sort");
    var dir = current ? (current === "descending" ? "ascending" : "descending") : (numeric ? "descending" : "ascending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (r, i) { r._order = i; });
    rows.sort(function (a, b) {
      var x = cellKey(a, col, numeric), y = cellKey(b, col, numeric);
      if (x < y) return dir === "ascending" ? -1 : 1;
      if (x > y) return dir === "ascending" ? 1 : -1;
      return a._order - b._order;  // stable: ties keep their previous order
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
  }

  function applyFilter(input) {
    var table = document.getElementById(input.getAttribute("data-filter-for"));
    if (!table) return;
    var words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
    var shown = 0;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
      var text = r.textContent.toLowerCase();
      var keep = words.every(function (w) { return text.indexOf(w) !== -1; });
      r.hidden = !keep;
      if (keep) shown += 1;
    });
    var counter = document.querySelector('[data-count-for="' + table.id + '"]');
    if (counter) counter.textContent = shown + " of " + table.tBodies[0].rows.length + " shown";
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable-table"), function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
        if (!th.classList.contains("sortable")) return;
        th.tabIndex = 0;
        th.addEventListener("click", function () { sortBy(table, th); });
        th.addEventListener("keydown", function (e) {
          if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, th); }
        });
      });
    });
    Array.prototype.forEach.call(document.querySelectorAll("input[data-filter-for]"), function (input) {
      input.addEventListener("input", function () { applyFilter(input); });
      applyFilter(input);
    });
  });
})();

/* mmbalance leaderboard site: sortable tables and a method-family filter (progressive enhancement; the
   tables are complete without this script). No dependencies. Written for this site; MIT like the project. */
(function () {
  "use strict";

  function sortKey(row, col) {
    var cell = row.cells[col];
    if (!cell) { return ""; }
    var v = cell.getAttribute("data-sort");
    return v === null ? cell.textContent.trim() : v;
  }

  function sortTable(table, col, th) {
    var numeric = th.getAttribute("data-type") === "num";
    var current = th.getAttribute("aria-sort");
    var dir = current ? (current === "ascending" ? "descending" : "ascending")
                      : (numeric ? "descending" : "ascending");
    var heads = table.tHead.rows[0].cells;
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute("aria-sort"); }
    th.setAttribute("aria-sort", dir);
    var sign = dir === "ascending" ? 1 : -1;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows).map(function (row, index) {
      var k = sortKey(row, col);
      var missing = k === "" || (numeric && isNaN(parseFloat(k)));
      return { row: row, index: index, missing: missing, key: numeric ? parseFloat(k) : k.toLowerCase() };
    });
    rows.sort(function (a, b) {
      if (a.missing !== b.missing) { return a.missing ? 1 : -1; }  /* empty cells last, either way */
      if (!a.missing && a.key !== b.key) { return (a.key < b.key ? -1 : 1) * sign; }
      return a.index - b.index;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
  }

  function makeSortable(table) {
    var heads = table.tHead ? table.tHead.rows[0].cells : [];
    Array.prototype.forEach.call(heads, function (th, col) {
      var button = document.createElement("button");
      button.type = "button";
      button.title = "sort by this column";
      while (th.firstChild) { button.appendChild(th.firstChild); }
      th.appendChild(button);
      button.addEventListener("click", function () { sortTable(table, col, th); });
    });
  }

  function addFamilyFilter(table) {
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    var families = [];
    rows.forEach(function (r) {
      var f = r.getAttribute("data-family");
      if (f && families.indexOf(f) < 0) { families.push(f); }
    });
    if (families.length < 2) { return; }
    families.sort();
    var label = document.createElement("label");
    label.className = "filter";
    label.appendChild(document.createTextNode("Method family: "));
    var select = document.createElement("select");
    select.appendChild(new Option("all (" + rows.length + " rows)", ""));
    families.forEach(function (f) { select.appendChild(new Option(f, f)); });
    label.appendChild(select);
    var anchor = table.closest(".scroll") || table;
    anchor.parentNode.insertBefore(label, anchor);
    select.addEventListener("change", function () {
      rows.forEach(function (r) {
        r.hidden = select.value !== "" && r.getAttribute("data-family") !== select.value &&
                   !r.classList.contains("pinned");
      });
    });
  }

  document.querySelectorAll("table.sortable").forEach(makeSortable);
  document.querySelectorAll("table[data-filter=family]").forEach(addFamilyFilter);
}());

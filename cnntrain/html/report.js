// cnntrain's report.html: sortable tables and the charts (uPlot), drawn from the page's own data
// (the JSON block #report-data). Text goes into the page as text (textContent, uPlot's legend
// and its canvas), never as markup.
"use strict";
(function () {
  // matplotlib's tab10: the colours of curves.png and the other figures
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf"];
  const HEIGHT = 270;

  // A cell's sort key: its data-v number if it has one, else its text; empty cells sort last
  // in either direction.
  function sortKey(cell) {
    const v = cell ? cell.dataset.v : undefined;
    if (v !== undefined && v !== "" && !Number.isNaN(parseFloat(v))) return { rank: 0, v: parseFloat(v) };
    const text = cell ? cell.textContent.trim() : "";
    return text === "" ? { rank: 2, v: "" } : { rank: 1, v: text };
  }

  function compare(a, b, sign) {
    if (a.rank !== b.rank) {
      if (a.rank === 2 || b.rank === 2) return a.rank === 2 ? 1 : -1;
      return sign * (a.rank - b.rank);
    }
    if (a.rank === 0) return sign * (a.v - b.v);
    return sign * a.v.localeCompare(b.v, undefined, { numeric: true });
  }

  function sortTable(table, column, th) {
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    for (const other of th.parentNode.cells) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const body = table.tBodies[0];
    const rows = Array.from(body.rows).map((row) => ({ row, key: sortKey(row.cells[column]) }));
    rows.sort((a, b) => compare(a.key, b.key, ascending ? 1 : -1)); // stable: ties keep their order
    body.append(...rows.map((r) => r.row));
  }

  function sortable(table) {
    const head = table.tHead && table.tHead.rows[0];
    if (!head || !table.tBodies.length) return;
    Array.from(head.cells).forEach((th, column) => {
      th.tabIndex = 0;
      th.title = "click to sort";
      th.addEventListener("click", () => sortTable(table, column, th));
      th.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortTable(table, column, th); }
      });
    });
  }

  // Whole numbers only on an epoch axis (no epoch 1.5), as curves.png does.
  const WHOLE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

  function chart(spec) {
    const el = document.getElementById(spec.id);
    if (!el) return;
    const many = spec.x.length > 60;
    const series = [{ label: spec.xlabel }].concat(spec.series.map((s, i) => ({
      label: s.label,
      stroke: s.color || COLORS[i % COLORS.length],
      width: 2,
      spanGaps: true,
      points: { show: !many, size: 6 },
      value: (u, v) => (v == null ? "-" : Number(v).toPrecision(4)),
    })));
    const opts = {
      title: spec.title,
      width: Math.max(el.clientWidth, 300),
      height: HEIGHT,
      scales: { x: { time: false } },
      axes: [
        { label: spec.xlabel, incrs: spec.whole ? WHOLE : undefined },
        { label: spec.ylabel, size: 64 },
      ],
      series: series,
      cursor: { drag: { x: true, y: false } },
    };
    const plot = new uPlot(opts, [spec.x].concat(spec.series.map((s) => s.values)), el);
    let pending = 0;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(() => plot.setSize({ width: Math.max(el.clientWidth, 300), height: HEIGHT }), 100);
    });
  }

  document.querySelectorAll("table.sortable").forEach(sortable);
  const data = JSON.parse(document.getElementById("report-data").textContent);
  (data.charts || []).forEach(chart);
})();

// The Overview page: one EventSource on /overview/events.
// - `history` (JSON, once per connection): the charts' series, uPlot's columns;
// - `counts` (HTML rendered by the server, escaped there): swapped into #counts;
// - `points` (JSON): new chart points, appended (those already shown are skipped).
(function () {
  "use strict";
  var HOUR = 3600;
  var COLORS = { completed: "#2e7d32", failed: "#c62828", queued: "#1565c0", running: "#ef6c00" };
  var charts = {};

  function ink() {
    var color = getComputedStyle(document.body).color || "#888";
    return { axis: color, grid: "rgba(128,128,128,0.25)" };
  }

  function size(el) {
    return { width: Math.max(240, el.clientWidth), height: 200 };
  }

  function options(el, names, unit) {
    var c = ink();
    var axis = { stroke: c.axis, grid: { stroke: c.grid }, ticks: { stroke: c.grid } };
    var series = [{}].concat(names.map(function (name) {
      return { label: name, stroke: COLORS[name], width: 2, value: function (u, v) {
        return v == null ? "–" : (Math.round(v * 100) / 100) + unit;
      } };
    }));
    var s = size(el);
    return {
      width: s.width, height: s.height, series: series,
      scales: { x: { time: true }, y: { range: function (u, lo, hi) { return [0, Math.max(1, hi)]; } } },
      axes: [axis, Object.assign({ size: 44 }, axis)],
      legend: { live: false }
    };
  }

  function makeChart(key, id, names, unit, columns) {
    var el = document.getElementById(id);
    if (!el || typeof uPlot === "undefined") return;
    if (charts[key]) { charts[key].columns = columns; charts[key].setData(columns); return; }
    el.textContent = "";
    charts[key] = new uPlot(options(el, names, unit), columns, el);
    charts[key].columns = columns;
  }

  function append(key, rows) {
    var chart = charts[key];
    if (!chart || !rows.length) return;
    var cols = chart.columns;
    var last = cols[0].length ? cols[0][cols[0].length - 1] : -Infinity;
    rows.forEach(function (row) {
      if (row[0] <= last) return;
      for (var i = 0; i < cols.length; i++) cols[i].push(row[i]);
    });
    var cutoff = cols[0][cols[0].length - 1] - HOUR;
    var drop = 0;
    while (drop < cols[0].length && cols[0][drop] < cutoff) drop++;
    if (drop) cols.forEach(function (col) { col.splice(0, drop); });
    chart.setData(cols);
  }

  function setStatus(state, text) {
    var el = document.getElementById("live-status");
    if (!el) return;
    el.setAttribute("data-state", state);
    el.textContent = text;
  }

  function connect() {
    var counts = document.getElementById("counts");
    if (!counts || typeof EventSource === "undefined") return;
    var source = new EventSource(counts.getAttribute("data-events"));
    window.OBB_OVERVIEW = { source: source, charts: charts, updates: 0 };
    source.addEventListener("open", function () { setStatus("live", "live"); });
    source.addEventListener("error", function () {
      setStatus("down", source.readyState === EventSource.CLOSED ? "disconnected: reload" : "reconnecting…");
    });
    source.addEventListener("history", function (e) {
      var h = JSON.parse(e.data);
      makeChart("throughput", "chart-throughput", ["completed", "failed"], "/s", h.throughput);
      makeChart("depth", "chart-depth", ["queued", "running"], "", h.depth);
    });
    source.addEventListener("counts", function (e) {
      counts.innerHTML = e.data;  // rendered and escaped by the server
      if (window.OBB) window.OBB.refreshAges(counts);
      window.OBB_OVERVIEW.updates += 1;
      setStatus("live", "live");
    });
    source.addEventListener("points", function (e) {
      var p = JSON.parse(e.data);
      append("throughput", p.throughput);
      append("depth", p.depth);
    });
    window.addEventListener("beforeunload", function () { source.close(); });
  }

  var resizing = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizing);
    resizing = setTimeout(function () {
      Object.keys(charts).forEach(function (key) {
        var el = charts[key].root.parentNode;
        charts[key].setSize(size(el));
      });
    }, 150);
  });

  document.addEventListener("DOMContentLoaded", connect);
})();

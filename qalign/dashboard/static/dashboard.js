// qalign dashboard: fetch the page's JSON (body[data-api]), render it, poll for changes.
// Every value from the database goes into the page through textContent, never as HTML.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#1a73e8", "#e8710a", "#188038", "#d93025", "#9334e6", "#12b5cb",
                  "#f9ab00", "#5f6368", "#b31412", "#0d652d"];
  const body = document.body;
  const api = body.dataset.api;
  const pollMs = Number(body.dataset.pollMs) || 1500;
  let shown = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function duration(s) {
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}`;
  }

  function fmt(v, f) {
    if (v === null || v === undefined || v === "") return f === "text" ? "" : "-";
    if (typeof v === "string") {
      if (f === "time") return v.slice(0, 19).replace("T", " ") + " UTC";
      return v;
    }
    if (typeof v !== "number") return String(v);
    switch (f) {
      case "int": return String(Math.round(v));
      case "f3": return v.toFixed(3);
      case "f2": return v.toFixed(2);
      case "f1": return v.toFixed(1);
      // an R-hat of a nearly constant quantity can be astronomically large
      case "rhat": return Math.abs(v) >= 1e4 ? v.toExponential(2) : v.toFixed(3);
      case "pct": return (100 * v).toFixed(1) + "%";
      case "dur": return duration(v);
      default: return String(v);
    }
  }

  function cell(col, v) {
    const td = el("td", {"data-col": col.key, class: col.fmt});
    if (v && typeof v === "object" && "href" in v) {
      td.append(el("a", {href: v.href}, v.text));
    } else if (v && typeof v === "object" && "before" in v) {
      td.append(el("span", {class: "kept"}, v.before), el("mark", {class: "cutmark"}, "|"),
                el("span", {class: "new"}, v.after));
    } else {
      td.textContent = fmt(v, col.fmt);
    }
    return td;
  }

  function table(t) {
    const head = el("tr", {}, ...t.columns.map(c => el("th", {"data-col": c.key, class: c.fmt}, c.label)));
    const rows = t.rows.map(r => el("tr", {"data-key": r.key, class: r.cls},
                                    ...t.columns.map(c => cell(c, r.cells[c.key]))));
    return el("section", {"data-table": t.key},
              el("h2", {}, t.title), t.note ? el("p", {class: "note"}, t.note) : null,
              t.rows.length ? el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows))
                            : el("p", {class: "muted"}, "nothing yet"));
  }

  function ticks(lo, hi, n) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map(k => k * mag).find(s => s >= raw) || raw;
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(t);
    return out;
  }

  function label(x) {
    const a = Math.abs(x);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return x.toExponential(1);
    return String(Number(x.toPrecision(4)));
  }

  function chart(c) {
    const W = 460, H = 250, L = 52, R = 10, T = 10, B = 34;
    const fig = el("figure", {"data-chart": c.key}, el("figcaption", {}, c.title));
    const pts = c.series.flatMap(s => s.points.filter(p => typeof p[1] === "number"));
    if (!pts.length) {
      fig.append(el("p", {class: "muted"}, "no data yet"));
      if (c.note) fig.append(el("p", {class: "note"}, c.note));
      return fig;
    }
    let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
    let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
    const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
    const g = svg("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img"});
    g.append(svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"}));
    g.append(svg("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"}));
    for (const t of ticks(x0, x1, 5)) {
      g.append(svg("text", {x: sx(t), y: H - B + 13, "text-anchor": "middle"}, label(t)));
    }
    for (const t of ticks(y0, y1, 5)) {
      g.append(svg("line", {x1: L, y1: sy(t), x2: W - R, y2: sy(t), stroke: "#eee"}));
      g.append(svg("text", {x: L - 4, y: sy(t) + 3, "text-anchor": "end"}, label(t)));
    }
    g.append(svg("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"}, c.x));
    g.append(svg("text", {x: 10, y: (T + H - B) / 2, "text-anchor": "middle",
                          transform: `rotate(-90 10 ${(T + H - B) / 2})`}, c.y));
    const legend = el("div", {class: "legend"});
    c.series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      let d = "", pen = "M", n = 0;
      for (const [x, y] of s.points) {
        if (typeof y !== "number") { pen = "M"; continue; }
        d += `${pen}${sx(x).toFixed(1)},${sy(y).toFixed(1)} `;
        pen = "L";
        n += 1;
      }
      const path = svg("path", {d, fill: "none", stroke: color, "stroke-width": 1.5,
                                "data-series": s.name, "data-n": n});
      const last = s.points.filter(p => typeof p[1] === "number").pop();
      if (last) path.setAttribute("data-last", `${last[0]},${last[1]}`);
      g.append(path);
      for (const [x, y] of s.points) {
        if (typeof y !== "number") continue;
        const dot = svg("circle", {cx: sx(x), cy: sy(y), r: 2, fill: color});
        dot.append(svg("title", {}, `${s.name}: ${label(x)}, ${label(y)}`));
        g.append(dot);
      }
      legend.append(el("span", {style: `color:${color}`}, "■ " + s.name));
    });
    fig.append(g, legend);
    if (c.note) fig.append(el("p", {class: "note"}, c.note));
    return fig;
  }

  function render(doc) {
    const crumbs = document.getElementById("crumbs");
    crumbs.replaceChildren(...doc.crumbs.map(c => el("a", {href: c.href}, c.text)));
    document.getElementById("title").textContent = doc.title;
    document.getElementById("subtitle").textContent = doc.subtitle || "";
    const parts = [];
    if (doc.prompt) parts.push(el("p", {class: "prompt"}, "prompt: " + doc.prompt));
    parts.push(el("dl", {class: "stats"}, ...doc.stats.map(s =>
      el("div", {"data-stat": s.key}, el("dt", {}, s.label), el("dd", {}, fmt(s.value, s.fmt))))));
    if (doc.charts.length) parts.push(el("div", {class: "charts"}, ...doc.charts.map(chart)));
    parts.push(...doc.tables.map(table));
    document.getElementById("content").replaceChildren(...parts);
  }

  async function tick() {
    const status = document.getElementById("status");
    try {
      const resp = await fetch(api + window.location.search, {cache: "no-store"});
      const doc = await resp.json();
      if (!resp.ok) {
        status.textContent = doc.error || `error ${resp.status}`;
      } else {
        const asOf = doc.as_of;
        delete doc.as_of;
        const key = JSON.stringify(doc);
        if (key !== shown) {
          shown = key;
          render(doc);
        }
        status.textContent = `live: updated ${fmt(asOf, "time")}`;
        body.dataset.updated = asOf;
      }
    } catch (err) {
      status.textContent = "cannot reach the dashboard server; retrying";
    } finally {
      window.setTimeout(tick, pollMs);
    }
  }
  tick();
})();

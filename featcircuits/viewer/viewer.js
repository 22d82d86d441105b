// featcircuits circuit viewer: plain JS + SVG, no network. Every string from the data is
// inserted with textContent or setAttribute, never as HTML.
"use strict";
const DATA = JSON.parse(document.getElementById("circuit-data").textContent);
const SVGNS = "http://www.w3.org/2000/svg";
const POS = "#1f5ac8", NEG = "#d62b2b", ERR = "#8a5a00";
const BAND = { embed: 0, attn: 1, mlp: 2, resid: 3 };

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function sv(tag, attrs) {
  const e = document.createElementNS(SVGNS, tag);
  for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
  return e;
}
function fmt(x) { return (x === null || x === undefined || isNaN(x)) ? "n/a" : (+x).toPrecision(3); }
function row(site) {
  if (site === "metric") return null;
  if (site === "embed") return 0;
  const [kind, layer] = site.split("_");
  return 3 * (+layer) + (BAND[kind] || 3);
}
function rowName(r) {
  if (r === 0) return "embed";
  const layer = Math.floor((r - 1) / 3), kind = ["attn", "mlp", "resid"][(r - 1) % 3];
  return kind + "_" + layer;
}

const nodes = DATA.nodes, links = DATA.links, cards = DATA.cards || {};
const byId = new Map(nodes.map(n => [String(n.id), n]));
const positional = nodes.some(n => n.position !== undefined && n.position >= 0);
const positions = [...new Set(nodes.filter(n => n.position >= 0).map(n => n.position))].sort((a, b) => a - b);
const tokens = DATA.prompt_tokens || [];
const feats = nodes.filter(n => n.kind !== "error" && n.kind !== "metric");
const errs = nodes.filter(n => n.kind === "error");
const fmax = Math.max(1e-12, ...feats.map(n => Math.abs(n.effect || 0)));
const emax = Math.max(1e-12, ...errs.map(n => Math.abs(n.effect || 0)));
const wmax = Math.max(1e-12, ...links.map(l => Math.abs(l.weight || 0)));

// ---- layout: one row per site (bottom to top), columns = token positions or one per node
const rows = [...new Set(nodes.map(n => row(String(n.site))).filter(r => r !== null))].sort((a, b) => a - b);
const rowY = new Map(), H = 34, M = { l: 90, r: 30, t: 40, b: 50 };
const top = M.t, nRows = rows.length + 1;
rows.forEach((r, i) => rowY.set(r, top + (nRows - 1 - i) * H + H));
const metricY = top + H / 2;
const cells = new Map();
for (const n of nodes) {
  const r = row(String(n.site));
  const key = r + ":" + (positional ? n.position : 0);
  if (!cells.has(key)) cells.set(key, []);
  cells.get(key).push(n);
}
const colW = positional ? Math.max(60, 700 / Math.max(1, positions.length), ...[...cells.values()].map(c => 18 * c.length)) : 0;
const perRow = Math.max(1, ...[...cells.values()].map(c => c.length));
const W = M.l + M.r + (positional ? colW * Math.max(1, positions.length) : Math.max(600, 18 * perRow));
const xy = new Map();
for (const [key, list] of cells) {
  const [r, p] = key.split(":");
  list.sort((a, b) => Math.abs(b.effect || 0) - Math.abs(a.effect || 0));
  const x0 = positional ? M.l + colW * Math.max(0, positions.indexOf(+p)) : M.l;
  const w = positional ? colW : W - M.l - M.r;
  list.forEach((n, i) => {
    const y = r === "null" ? metricY : rowY.get(+r);
    const x = n.kind === "metric" && positional ? M.l + colW * (positions.length - 0.5) : x0 + w * (i + 0.5) / list.length;
    xy.set(String(n.id), [x, y]);
  });
}
const HT = top + nRows * H + M.b;

// ---- drawing
const svg = document.getElementById("graph");
svg.setAttribute("width", W); svg.setAttribute("height", HT);
const gEdges = sv("g"), gNodes = sv("g"), gAxes = sv("g");
svg.append(gAxes, gEdges, gNodes);
for (const r of rows) {
  const t = sv("text", { x: 6, y: rowY.get(r) + 4, class: "rowlabel" });
  t.textContent = rowName(r); gAxes.append(t);
  gAxes.append(sv("line", { x1: M.l - 10, x2: W - M.r, y1: rowY.get(r), y2: rowY.get(r), stroke: "#eee" }));
}
if (positional) positions.forEach((p, i) => {
  const t = sv("text", { x: M.l + colW * (i + 0.5), y: HT - 20, "text-anchor": "middle", class: "collabel" });
  t.textContent = tokens[p] !== undefined ? tokens[p] : "t" + p; gAxes.append(t);
});
function colour(n) {
  if (n.kind === "metric") return "#444";
  const e = n.effect || 0;
  const s = n.kind === "error" ? Math.min(1, Math.abs(e) / emax) : Math.min(1, Math.abs(e) / fmax);
  const base = e >= 0 ? [31, 90, 200] : [214, 43, 43];
  const mix = c => Math.round(255 - (255 - c) * (0.25 + 0.75 * s));
  return "rgb(" + base.map(mix).join(",") + ")";
}
function size(n) {
  if (n.kind === "metric") return 9;
  const s = Math.abs(n.effect || 0) / (n.kind === "error" ? emax : fmax);
  return 3.5 + 8 * Math.sqrt(Math.min(1, s));
}
const edgeEls = [];
for (const l of links) {
  const a = xy.get(String(l.source)), b = xy.get(String(l.target));
  if (!a || !b) continue;
  const w = Math.abs(l.weight || 0) / wmax;
  const p = sv("path", { class: "edge", d: "M" + a[0] + "," + a[1] + " C" + a[0] + "," + (a[1] + b[1]) / 2 + " " + b[0] + "," + (a[1] + b[1]) / 2 + " " + b[0] + "," + b[1],
    stroke: l.weight >= 0 ? POS : NEG, "stroke-opacity": 0.15 + 0.6 * w, "stroke-width": 0.5 + 3 * w });
  p.__w = w; edgeEls.push(p); gEdges.append(p);
}
const nodeEls = new Map();
for (const n of nodes) {
  const id = String(n.id), [x, y] = xy.get(id), r = size(n);
  let e;
  if (n.kind === "error") e = sv("rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r, stroke: ERR, "stroke-width": 1.5, "stroke-dasharray": "2,1" });
  else if (n.kind === "metric") e = sv("polygon", { points: [0, 1, 2, 3, 4, 5, 6, 7].map(i => (x + r * Math.cos(i * Math.PI / 4 + Math.PI / 8)) + "," + (y + r * Math.sin(i * Math.PI / 4 + Math.PI / 8))).join(" ") });
  else e = sv("circle", { cx: x, cy: y, r: r, stroke: "#fff", "stroke-width": 0.5 });
  e.setAttribute("fill", colour(n));
  e.setAttribute("class", "node");
  e.setAttribute("data-id", id);
  const tip = sv("title"); tip.textContent = (n.label ? n.label + "\n" : "") + id + "\neffect " + fmt(n.effect); e.append(tip);
  e.addEventListener("click", () => pin(id));
  nodeEls.set(id, e); gNodes.append(e);
}

// ---- controls
const title = DATA.title || "circuit";
document.getElementById("title").textContent = title; document.title = title;
document.getElementById("counts").textContent = nodes.length + " nodes, " + links.length + " edges; features and error nodes on separate colour scales (max |effect| " + fmt(fmax) + " / " + fmt(emax) + ")";
const slider = document.getElementById("edgeslider");
function filterEdges() {
  const t = slider.value / 100;
  document.getElementById("edgeval").textContent = fmt(t * wmax);
  for (const p of edgeEls) p.style.display = p.__w >= t ? "" : "none";
}
slider.addEventListener("input", filterEdges); filterEdges();
document.getElementById("search").addEventListener("input", ev => {
  const q = ev.target.value.trim().toLowerCase();
  for (const [id, e] of nodeEls) {
    const n = byId.get(id), hit = !q || id.toLowerCase().includes(q) || String(n.label || "").toLowerCase().includes(q);
    e.classList.toggle("dim", !hit);
  }
});

// ---- the card
function context(ex, maxAct) {
  const d = el("div", { class: "ctx" });
  ex.tokens.forEach((t, i) => {
    const a = ex.acts[i] || 0, s = Math.max(0, Math.min(1, a / (maxAct || 1)));
    const sp = el("span", { title: "act " + fmt(a) }, String(t).replace(/\n/g, "\u23ce"));  // newlines shown as symbols
    sp.style.background = "rgba(255,140,0," + (0.85 * s).toFixed(3) + ")";
    if (i === ex.peak) sp.className = "peak";
    d.append(sp);
  });
  d.append(el("span", { class: "muted" }, "  (" + fmt(ex.value) + ")"));
  return d;
}
function tokenList(list) {
  const d = el("div");
  for (const t of list || []) d.append(el("span", { class: "tok", title: fmt(t.value) }, t.token));
  return d;
}
function edgeTable(list, key) {
  const tb = el("table");
  for (const l of list) {
    const tr = el("tr"), a = el("a", { class: "nid" }, String(l[key]));
    a.addEventListener("click", () => pin(String(l[key])));
    const other = byId.get(String(l[key]));
    tr.append(el("td", {}, fmt(l.weight)), el("td"), el("td", { class: "muted" }, other && other.label ? other.label : ""));
    tr.children[1].append(a); tb.append(tr);
  }
  return tb;
}
function pin(id) {
  const n = byId.get(id); if (!n) return;
  for (const e of nodeEls.values()) e.classList.remove("pinned");
  nodeEls.get(id).classList.add("pinned");
  const box = document.getElementById("card"); box.replaceChildren();
  box.append(el("h2", { style: "font-size:15px;margin:4px 0" }, n.label || id));
  const facts = el("table");
  const add = (k, v) => { const tr = el("tr"); tr.append(el("td", { class: "muted" }, k), el("td", {}, v)); facts.append(tr); };
  add("node", id); add("site", n.site); add("kind", n.kind); add("effect", fmt(n.effect));
  if (n.position >= 0) add("token", tokens[n.position] !== undefined ? tokens[n.position] : "t" + n.position);
  for (const k of ["activation", "activation_clean", "activation_patch"]) if (n[k] !== undefined && n[k] !== null) add(k, fmt(n[k]));
  const c = cards[id];
  if (c) { add("density", fmt(c.density)); add("mean act", fmt(c.mean)); add("max act", fmt(c.max)); }
  box.append(facts);
  const url = n.neuronpedia || (c && c.neuronpedia);
  if (url && /^https:\/\/www\.neuronpedia\.org\//.test(url)) box.append(el("a", { href: url, target: "_blank", rel: "noopener" }, "Neuronpedia"));
  if (c) {
    box.append(el("h3", {}, "Top activating contexts" + (DATA.cards_source ? " \u2014 " + DATA.cards_source : "")));
    for (const ex of c.top || []) box.append(context(ex, c.max));
    if ((c.quantiles || []).length) {
      box.append(el("h3", {}, "Sampled active contexts (low to high)"));
      for (const ex of c.quantiles) box.append(context(ex, c.max));
    }
    box.append(el("h3", {}, "Promotes (direct effect on logits)"), tokenList(c.promoted));
    box.append(el("h3", {}, "Suppresses"), tokenList(c.suppressed));
  } else if (n.kind === "feature") box.append(el("p", { class: "muted" }, "No card for this feature."));
  const ins = links.filter(l => String(l.target) === id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
  const outs = links.filter(l => String(l.source) === id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
  box.append(el("h3", {}, "Strongest incoming edges"), edgeTable(ins, "source"));
  box.append(el("h3", {}, "Strongest outgoing edges"), edgeTable(outs, "target"));
}
window.featcircuitsViewer = { pin: pin, nodeCount: nodes.length };

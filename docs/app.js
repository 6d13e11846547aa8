// The docs site: reads window.SITE_DATA (docs/data/site.js, written by `python -m clt.site.export`)
// and draws the overview, the layer-to-layer feature graphs and the feature pages. No library, no network.
"use strict";

const SITE = window.SITE_DATA;
const SVG_NS = "http://www.w3.org/2000/svg";
const content = document.getElementById("content");
const tooltip = document.getElementById("tooltip");

// ---- small helpers -------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}
const fmt = (x, digits = 4) => (x === null || x === undefined || Number.isNaN(x) ? "-" : Number(x).toFixed(digits));
const pct = (x, digits = 1) => (x === null || x === undefined || Number.isNaN(x) ? "-" : (100 * x).toFixed(digits) + "%");
const featureHash = (dictId, index) => `#/feature/${encodeURIComponent(dictId)}/${index}`;
const pageOf = (dictId, index) => (SITE.dictionaries[dictId]?.feature_pages || []).find((p) => p.index === index);
const labelOf = (dictId) => SITE.dictionaries[dictId]?.label || dictId;

function table(headers, rows) {
  return el("table", {}, el("tr", {}, ...headers.map((h) => el("th", { text: h }))),
    ...rows.map((row) => el("tr", {}, ...row.map((cell) => (cell instanceof Node ? el("td", { class: "name" }, cell) : el("td", { text: cell }))))));
}

function showTooltip(event, text) {
  tooltip.textContent = text;
  tooltip.hidden = false;
  tooltip.style.left = `${event.clientX + 12}px`;
  tooltip.style.top = `${event.clientY + 12}px`;
}

// Activation colour: white (0) -> amber -> deep red (the feature's maximum).
function heat(t) {
  const stops = [[255, 255, 255], [253, 186, 116], [234, 88, 12], [127, 29, 29]];
  const x = Math.max(0, Math.min(1, t)) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
  return `rgb(${c.join(",")})`;
}

// ---- overview ----------------------------------------------------------------------------------
function renderOverview() {
  const o = SITE.overview;
  const p = o.policy;
  const greedy = o.evaluation?.modes?.greedy;
  content.append(el("h2", { text: `Policy: ${o.run}` }), el("div", { class: "cards" },
    ...[[p.parameters?.toLocaleString(), "parameters"], [p.num_encoder_layers, "encoder layers"], [p.embed_dim, "embedding width"],
      [p.num_heads, "heads"], [o.env.num_loc, "cities per instance"], [p.checkpoint_epoch, "checkpoint epoch"],
      [greedy ? greedy.gap_percent.toFixed(2) + "%" : "-", `greedy gap to ${o.evaluation?.reference?.solver || "reference"}`]]
      .map(([value, label]) => el("div", { class: "card" }, el("div", { class: "value", text: value ?? "-" }), el("div", { class: "label", text: label })))));
  if (o.evaluation) {
    content.append(el("h3", { text: `Tour length on ${o.evaluation.num_instances} instances` }), table(["decoding", "mean length", "gap", "ms / instance"],
      Object.entries(o.evaluation.modes).map(([mode, m]) => [mode, fmt(m.mean_length), m.gap_percent.toFixed(2) + "%", fmt(1000 * m.seconds_per_instance, 2)])));
  }
  const rows = o.dictionaries.map((d) => {
    const s = d.summary;
    const splice = d.splice?.transcoder || {};
    return [d.kind, d.name, s.features ?? "-", s.k ?? "-", s.activation ?? "topk", fmt(s["val/fvu"]), fmt(s.ridge_val_fvu),
      fmt(s["val/l0"], 1), pct(s["val/dead_fraction"]), pct(s["val/dense_fraction"]), fmt(s["val/effective_features"], 0), pct(splice.gap, 2), pct(splice.action_agreement), fmt(splice.mean_kl, 3), pct(splice.recovered)];
  });
  content.append(el("h3", { text: "SAEs and transcoders (validation split; splicing on fresh instances)" }),
    table(["kind", "name", "features", "k", "activation", "FVU", "ridge FVU", "L0", "dead", "dense", "effective features", "splice gap", "agreement", "KL", "recovered"], rows),
    el("p", { class: "note", text: "FVU: fraction of variance unexplained (ridge: the best linear map, for scale). Splice gap: the tour-length change when the transcoder's output replaces the real activation inside the policy; agreement: greedy actions unchanged along the original tours; recovered: the share of the mean-ablation damage the transcoder undoes. Dead: features that never fire on the validation rows; dense: features firing on more than half of them; effective features: exp of the entropy of the firing frequencies, how many features are in use as if equally often." }));
  for (const g of o.generalization || []) {
    const head = ["trained on \\ evaluated on", ...g.evaluated_on];
    const cells = (f) => g.trained_on.map((row, i) => [row.condition, ...g.cells[i].map(f)]);
    content.append(el("h3", { class: "generalization", text: `Generalisation of ${g.pair}: FVU (that condition's ridge FVU)` }),
      table(head, cells((c) => `${fmt(c.fvu)} (${fmt(c.ridge_fvu)})`)),
      el("h3", { text: `Generalisation of ${g.pair}: splice gap (action agreement)` }),
      table(head, cells((c) => `${pct(c.gap, 2)} (${pct(c.agreement)})`)));
  }
}

// ---- layer-to-layer graph ------------------------------------------------------------------------
function renderGraphTab(tab, viewId) {
  const views = SITE.views.filter((v) => (tab === "sae" ? v.id === "sae" : v.id !== "sae"));
  if (!views.length) {
    content.append(el("div", { class: "empty", text: tab === "sae"
      ? "No SAE in this export. Train one (python -m sae.train_topk) and export again."
      : "No transcoder in this export. Train one (python -m clt.train_transcoder) and export again." }));
    return;
  }
  const view = views.find((v) => v.id === viewId) || views[0];
  const controls = el("div", { class: "controls" });
  if (views.length > 1) {
    for (const v of views) controls.append(el("button", { class: v.id === view.id ? "active" : "", text: v.title, onclick: () => { location.hash = `#/clt/${v.id}`; } }));
  }
  const slider = el("input", { type: "range", id: "threshold", min: "0", max: "100", value: "25" });
  const perPair = el("input", { type: "checkbox", id: "per-pair" });
  const count = el("span", { id: "edge-count" });
  controls.append(el("label", { text: "edge threshold " }, slider), el("label", {}, perPair, " scale each pair of columns on its own"), count);
  const details = el("div", { id: "details" }, el("p", { class: "note", text: "Hover a feature for its details; click it to open its page." }));
  const svg = drawGraph(view, details);
  content.append(el("h2", { text: view.title }), controls, el("div", { class: "graph-wrap" }, svg, details),
    el("p", { class: "note", text: "Columns are the points of the residual stream the dictionaries read, in order (dictionaries reading the same point stack in one column); each shows its most active features (circle area ~ firing frequency). Edges are direct-path virtual weights (decoder -> residual normalisations -> encoder) times the upstream feature's mean activation; blue excites, red inhibits. The slider hides edges below that percentage of the strongest edge (of all, or of their own pair of columns)." }));
  const strongest = { all: 1e-12 };
  for (const [up, , down, , attr] of view.edges) {
    strongest[`${up}>${down}`] = Math.max(strongest[`${up}>${down}`] || 1e-12, Math.abs(attr));
    strongest.all = Math.max(strongest.all, Math.abs(attr));
  }
  const update = () => {
    let shown = 0;
    for (const path of svg.querySelectorAll(".edge")) {
      const strength = Math.abs(Number(path.dataset.attr)) / strongest[perPair.checked ? path.dataset.pair : "all"];
      const visible = strength >= slider.value / 100;
      path.style.display = visible ? "" : "none";
      path.setAttribute("stroke-width", 0.5 + 4 * strength);
      path.setAttribute("stroke-opacity", 0.25 + 0.6 * strength);
      shown += visible;
    }
    count.textContent = `${shown} of ${view.edges.length} edges`;
  };
  slider.addEventListener("input", update);
  perPair.addEventListener("change", update);
  update();
}

// Columns are stream positions (layers): dictionaries that read the same point stack in one column.
function drawGraph(view, details) {
  const columns = [];
  for (const id of view.dictionaries) {
    const at = SITE.dictionaries[id].position;
    const column = columns.find((c) => c.at === at) || columns[columns.push({ at, ids: [] }) - 1];
    column.ids.push(id);
  }
  const rowsOf = (column) => column.ids.reduce((rows, id) => rows + 1 + SITE.dictionaries[id].feature_pages.length, 0);
  const row = 22, tallest = Math.max(...columns.map(rowsOf));
  const width = Math.max(520, 240 * columns.length), height = Math.max(300, row * tallest + 20);
  const svg = el("svg:svg", { id: "graph", width, height, viewBox: `0 0 ${width} ${height}` });
  const position = {};
  columns.forEach((column, c) => {
    const x = (width * (c + 0.5)) / columns.length;
    let y = 20;
    for (const id of column.ids) {
      svg.append(el("svg:text", { x, y, "text-anchor": "middle", text: labelOf(id) }));
      y += row;
      for (const page of SITE.dictionaries[id].feature_pages) {
        position[`${id}#${page.index}`] = [x, y];
        y += row;
      }
    }
  });
  const edgeLayer = el("svg:g"), nodeLayer = el("svg:g");
  for (const [up, i, down, j, attr] of view.edges) {
    const a = position[`${up}#${i}`], b = position[`${down}#${j}`];
    if (!a || !b) continue;
    const mid = (a[0] + b[0]) / 2;
    const path = el("svg:path", { class: "edge", d: `M${a[0]},${a[1]} C${mid},${a[1]} ${mid},${b[1]} ${b[0]},${b[1]}`,
      stroke: attr >= 0 ? "#2563eb" : "#dc2626", "data-attr": attr, "data-pair": `${up}>${down}`, "data-up": `${up}#${i}`, "data-down": `${down}#${j}` });
    path.addEventListener("mousemove", (event) => showTooltip(event, `${labelOf(up)} #${i} -> ${labelOf(down)} #${j}: ${fmt(attr, 3)}`));
    path.addEventListener("mouseleave", () => { tooltip.hidden = true; });
    edgeLayer.append(path);
  }
  for (const id of view.dictionaries) {
    for (const page of SITE.dictionaries[id].feature_pages) {
      const key = `${id}#${page.index}`;
      const [x, y] = position[key];
      const node = el("svg:circle", { class: "node", cx: x, cy: y, r: 3 + 9 * Math.sqrt(page.frequency), fill: "#f0b429",
        "data-dict": id, "data-index": page.index });
      node.addEventListener("mouseenter", () => highlight(svg, key, true, details, id, page));
      node.addEventListener("mouseleave", () => highlight(svg, key, false));
      node.addEventListener("click", () => { location.hash = featureHash(id, page.index); });
      nodeLayer.append(node);
    }
  }
  svg.append(edgeLayer, nodeLayer);
  return svg;
}

function highlight(svg, key, on, details, dictId, page) {
  for (const edge of svg.querySelectorAll(".edge")) edge.classList.toggle("dim", on && edge.dataset.up !== key && edge.dataset.down !== key);
  if (!on) return;
  details.replaceChildren(el("h3", { text: `${labelOf(dictId)} #${page.index}` }),
    el("div", { text: `fires on ${pct(page.frequency)} of nodes; mean ${fmt(page.mean, 3)}, max ${fmt(page.max, 3)}` }),
    el("div", { text: `strongest ${page.channels.hook} channels: ${page.channels.top.slice(0, 4).map(([c, w]) => `${c} (${fmt(w, 2)})`).join(", ")}` }),
    el("div", { text: `${page.downstream.length} downstream, ${page.upstream.length} upstream features listed on its page` }));
}

// ---- feature labels (clt.label) and the Features tab ---------------------------------------------------
// A feature's label row: [category index, label, score, null, frequency, [[descriptor, AUROC] x3]].
function labelRow(dictId, index) {
  const labels = SITE.dictionaries[dictId]?.labels;
  const row = labels?.features[index];
  return row ? { category: labels.categories[row[0]], label: row[1], score: row[2], null: row[3], frequency: row[4], top: row[5] } : null;
}

function labelBlock(dictId, index) {
  const l = labelRow(dictId, index);
  if (!l) return [el("p", { class: "note", text: "Not labelled: run `python -m clt.label --run_dir <run> --all`, then export again." })];
  const field = SITE.dictionaries[dictId].labels.field[index];
  return [el("div", { class: "feature-label" }, el("span", { class: `category cat-${l.category.split(" ")[0]}`, text: l.category }), el("span", { class: "label-text", text: l.label })),
    el("p", { class: "note", text: `score ${fmt(l.score, 3)} (folded AUROC of the label as a detector of the feature's firing), null threshold ${fmt(l.null, 3)} (99th percentile over instance permutations); fires on ${pct(l.frequency, 2)} of the export's nodes.` }),
    el("div", { class: "columns" },
      el("div", {}, el("h3", { text: "Best descriptors (AUROC; the band: chance to the null)" }), drawDescriptorBars(l)),
      el("div", {}, el("h3", { text: "Receptive field (mean activation over the unit square)" }),
        field.length ? drawField(field) : el("p", { class: "note", text: "It never fires on the export's instances." })))];
}

function drawDescriptorBars(l) {
  const width = 360, row = 22, height = row * l.top.length + 24, x0 = 130, scale = (a) => x0 + (width - x0 - 40) * a;
  const svg = el("svg:svg", { class: "descriptor-bars", width, height, viewBox: `0 0 ${width} ${height}` });
  const nullWidth = Math.max(0, scale(l.null) - scale(1 - l.null));
  svg.append(el("svg:rect", { x: scale(1 - l.null), y: 0, width: nullWidth, height: height - 20, fill: "#e4e7eb" }));
  l.top.forEach(([name, auroc], i) => {
    const folded = Math.max(auroc, 1 - auroc);
    svg.append(el("svg:text", { x: x0 - 6, y: row * i + 15, "text-anchor": "end", "font-size": 11, text: name + (auroc < 0.5 ? " (low)" : "") }),
      el("svg:rect", { x: scale(0.5), y: row * i + 4, width: Math.max(1, scale(folded) - scale(0.5)), height: row - 8, fill: "#2563eb" }),
      el("svg:text", { x: scale(folded) + 3, y: row * i + 15, "font-size": 10, text: fmt(folded, 2) }));
  });
  for (const a of [0, 0.5, 1]) svg.append(el("svg:text", { x: scale(a), y: height - 6, "text-anchor": "middle", "font-size": 10, text: String(a) }));
  return svg;
}

function drawField(field) {
  const side = Math.round(Math.sqrt(field.length)), size = 180, cell = size / side, top = Math.max(...field, 1e-9);
  const svg = el("svg:svg", { class: "field", width: size + 2, height: size + 2, viewBox: `-1 -1 ${size + 2} ${size + 2}` });
  field.forEach((v, k) => {
    const i = k % side, j = Math.floor(k / side);  // row-major from the bottom left
    const rect = el("svg:rect", { x: i * cell, y: size - (j + 1) * cell, width: cell, height: cell, fill: heat(v / top), stroke: "#e4e7eb" });
    rect.append(el("svg:title", { text: `x ${(i / side).toFixed(2)}-${((i + 1) / side).toFixed(2)}, y ${(j / side).toFixed(2)}-${((j + 1) / side).toFixed(2)}: mean ${fmt(v, 3)}` }));
    svg.append(rect);
  });
  return svg;
}

// Every labelled feature of every dictionary, searchable by label, category, dictionary and index.
function renderFeatureSearch() {
  const entries = [];
  for (const [id, dict] of Object.entries(SITE.dictionaries)) {
    if (!dict.labels) continue;
    dict.labels.features.forEach((_, index) => entries.push({ id, index, ...labelRow(id, index) }));
  }
  const input = el("input", { type: "search", id: "feature-search", placeholder: "search: a label, a category (spot, boundary, ...), a dictionary, an index (#42)", size: 60 });
  const count = el("span", { class: "note" });
  const holder = el("div", { class: "scroll" });
  const show = () => {
    const words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
    const hits = entries.filter((e) => words.every((w) => (w.startsWith("#") ? String(e.index) === w.slice(1)
      : `${labelOf(e.id)} ${e.id} ${e.category} ${e.label} ${e.index}`.toLowerCase().includes(w))));
    count.textContent = `${hits.length} of ${entries.length} features`;
    holder.replaceChildren(table(["dictionary", "feature", "category", "label", "score", "fires"],
      hits.slice(0, 200).map((e) => [el("span", { text: labelOf(e.id) }), el("a", { href: featureHash(e.id, e.index), text: `#${e.index}` }), e.category, e.label, fmt(e.score, 3), pct(e.frequency, 2)])));
  };
  input.addEventListener("input", show);
  content.append(el("h2", { text: "Features" }),
    el("p", { class: "note", text: "Each feature is labelled by measured geometry (python -m clt.label): the descriptor that best detects where it fires, with its AUROC, when that beats both 0.8 and the feature's own permutation null; otherwise unexplained, rare or dead." }),
    el("div", { class: "controls" }, input, count), holder);
  if (!entries.length) holder.append(el("div", { class: "empty", text: "No labels in this export: run `python -m clt.label --run_dir <run> --all`, then `python -m clt.site.export` again." }));
  else show();
  input.focus();
}

// ---- feature page --------------------------------------------------------------------------------
function renderFeature(dictId, index) {
  const page = pageOf(dictId, index);
  const dict = SITE.dictionaries[dictId];
  if (!dict || !(index >= 0 && index < dict.features)) {
    content.append(el("div", { class: "empty", text: `There is no feature ${index} of ${dictId} in this export.` }));
    return;
  }
  if (!page) {
    content.append(el("h2", { text: `${dict.label} feature #${index}` }),
      el("p", { class: "note", text: `${dict.kind} reading ${dict.read_hook}, writing ${dict.writes.join(", ")}. Maps and histograms are exported for the most active features; this one has its label and receptive field.` }),
      ...labelBlock(dictId, index));
    return;
  }
  content.append(el("h2", { text: `${dict.label} feature #${index}` }),
    el("p", { class: "note", text: `${dict.kind} reading ${dict.read_hook}, writing ${dict.writes.join(", ")}. Fires on ${pct(page.frequency, 2)} of nodes; mean activation ${fmt(page.mean, 3)}; max ${fmt(page.max, 3)}.` }),
    ...labelBlock(dictId, index),
    el("h3", { text: "Top-activating instances (cities coloured by activation; the policy's greedy tour; the square is its first city)" }),
    el("div", { class: "maps" }, ...page.top_instances.map((t) => drawMap(t, page.max))),
    el("div", { class: "columns" },
      el("div", {}, el("h3", { text: "Activation histogram (nodes where it fires)" }), drawHistogram(page.histogram)),
      el("div", {}, el("h3", { text: `Strongest decoder channels (${page.channels.hook})` }), table(["channel", "weight"], page.channels.top.map(([c, w]) => [String(c), fmt(w, 3)]))),
      neighbourList("Downstream features", page.downstream), neighbourList("Upstream features", page.upstream),
      ...(dict.kind === "sae" ? [] : [neighbourList("Upstream SAE features", page.upstream_sae)])));
}

function neighbourList(title, entries) {
  const rows = entries.map(([id, i, attr]) => [pageOf(id, i) ? el("a", { href: featureHash(id, i), text: `${labelOf(id)} #${i}` }) : el("span", { text: `${labelOf(id)} #${i}` }), fmt(attr, 3)]);
  return el("div", {}, el("h3", { text: title }), rows.length ? table(["feature", "attribution"], rows) : el("p", { class: "note", text: "none in this export" }));
}

function drawMap(top, max) {
  const instance = SITE.instances[String(top.instance)];
  const size = 220, pad = 12, scale = (v) => pad + v * (size - 2 * pad);
  const xy = (n) => [scale(instance.locs[2 * n]), size - scale(instance.locs[2 * n + 1])];
  const svg = el("svg:svg", { class: "tsp-map", width: size, height: size, viewBox: `0 0 ${size} ${size}` });
  const points = [...instance.tour, instance.tour[0]].map((n) => xy(n).join(",")).join(" ");
  svg.append(el("svg:polyline", { points, fill: "none", stroke: "#3e4c59", "stroke-width": 1.2 }));
  top.activations.forEach((a, n) => {
    const [x, y] = xy(n);
    const attrs = { fill: heat(a / (max || 1)), stroke: "#1f2933", "stroke-width": 0.8 };
    const mark = n === instance.tour[0]
      ? el("svg:rect", { ...attrs, x: x - 5.5, y: y - 5.5, width: 11, height: 11 })
      : el("svg:circle", { ...attrs, cx: x, cy: y, r: 5.5 });
    mark.append(el("svg:title", { text: `city ${n}: activation ${fmt(a, 3)}, visited ${instance.tour.indexOf(n) + 1}` }));
    svg.append(mark);
  });
  return el("div", { class: "map" }, svg, el("div", { class: "caption", text: `instance ${top.instance}: tour ${fmt(instance.length, 3)}, peak ${fmt(Math.max(...top.activations), 2)}` }));
}

function drawHistogram(histogram) {
  const width = 320, height = 140, counts = histogram.counts;
  const svg = el("svg:svg", { class: "histogram", width, height, viewBox: `0 0 ${width} ${height}` });
  const top = Math.max(1, ...counts), bar = (width - 40) / Math.max(counts.length, 1);
  counts.forEach((c, i) => {
    const h = ((height - 30) * c) / top;
    const rect = el("svg:rect", { x: 30 + i * bar, y: height - 20 - h, width: bar - 1, height: h, fill: "#f0b429" });
    rect.append(el("svg:title", { text: `${fmt(histogram.edges[i], 3)} to ${fmt(histogram.edges[i + 1], 3)}: ${c} nodes` }));
    svg.append(rect);
  });
  if (counts.length) {
    svg.append(el("svg:text", { x: 30, y: height - 5, "font-size": 11, text: fmt(histogram.edges[0], 2) }),
      el("svg:text", { x: width - 10, y: height - 5, "font-size": 11, "text-anchor": "end", text: fmt(histogram.edges[counts.length], 2) }));
  }
  return svg;
}

// ---- routing -------------------------------------------------------------------------------------
function route() {
  content.replaceChildren();
  tooltip.hidden = true;
  if (!SITE) {
    content.append(el("div", { class: "empty", text: "No data yet: run `python -m clt.site.export --run_dir <run>` to write docs/data/site.js, then reload." }));
    return;
  }
  document.getElementById("run-name").textContent = `run ${SITE.overview.run}`;
  const [tab = "overview", a, b] = location.hash.replace(/^#\/?/, "").split("/");
  const active = tab === "decision" ? "decisions" : tab;
  for (const link of document.querySelectorAll("#tabs a")) link.classList.toggle("active", link.dataset.tab === active);
  if (tab === "sae" || tab === "clt") renderGraphTab(tab, a);
  else if (tab === "feature") renderFeature(decodeURIComponent(a), Number(b));
  else if (tab === "features") renderFeatureSearch();
  else if (tab === "decisions") renderDecisionList();
  else if (tab === "decision") renderDecision(decodeURIComponent(a));
  else renderOverview();
  window.scrollTo(0, 0);
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);  // after decisions_tab.js has loaded too

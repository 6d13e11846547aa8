// The Decisions tab: attribution graphs of single decisions (window.DECISIONS, docs/data/decisions.js, written by
// `python -m clt.site.export` and `python -m clt.graph.attribute --export`). Uses app.js's helpers (el, fmt, pct,
// table, showTooltip, featureHash, pageOf).
"use strict";

const DECISIONS = window.DECISIONS || [];
// Short tags drawn beside labelled feature nodes (the category of the feature's label, clt.label).
const TAGS = { boundary: "hull", spot: "spot", separator: "side", "density / cluster": "dens", "tour structure": "tour", "decoding state": "step" };
// A graph whose removal predictions fail in the live policy is flagged: below this Pearson r it is not faithful.
const FAITHFUL_R = 0.5;
const faithful = (d) => d.verification?.live?.pearson_r === undefined || d.verification.live.pearson_r >= FAITHFUL_R;
const decisionHash = (name) => `#/decision/${encodeURIComponent(name)}`;

function renderDecisionList() {
  content.append(el("h2", { text: "Decisions: why the policy picks this city" }));
  if (!DECISIONS.length) {
    content.append(el("div", { class: "empty", text: "No attribution graph in this export. Export again with a multi-layer CLT (python -m clt.site.export), or add one with python -m clt.graph.attribute --export docs/data." }));
    return;
  }
  const rows = DECISIONS.map((d) => {
    const live = d.verification?.live || {};
    return [el("a", { href: decisionHash(d.name), text: d.name }), String(d.step), String(d.policy_tour[d.step]),
      d.candidates.slice(0, 3).map((c) => `${c.city} (${pct(c.probability)})`).join(", "),
      fmt(d.scores.graph.replacement, 3), fmt(d.scores.graph.completeness, 3), fmt(live.pearson_r, 3), pct(live.sign_agreement),
      fmt(d.verification?.edges?.scale_0?.total?.pearson_r, 3), pct(d.verification?.circuit?.faithfulness),
      faithful(d) ? "yes" : `NOT FAITHFUL (r < ${FAITHFUL_R})`];
  });
  content.append(table(["decision", "step", "picks", "candidates", "replacement", "completeness", "r (live)", "sign (live)", "edge r", "circuit", "faithful"], rows),
    el("p", { class: "note", text: "Each graph traces one choice through the local replacement model: the transcoders' active features at every (layer, city), an error node per (layer, city), the cities' input embeddings, and the target (the chosen city's pointer score minus the runner-up's, by default). Edges are exact direct effects in that model; r and sign agreement compare the graph's predicted effect of removing each of the most influential features with the live policy's response." }));
}

function renderDecision(name) {
  const d = DECISIONS.find((x) => x.name === name);
  if (!d) {
    content.append(el("div", { class: "empty", text: `No decision ${name} in this export.` }));
    return;
  }
  const picks = d.policy_tour[d.step];
  const live = d.verification?.live || {}, local = d.verification?.local || {};
  content.append(el("h2", { text: `Decision ${d.name}: step ${d.step}, the policy picks city ${picks}` }),
    el("p", { class: "note", text: `Run ${d.run} (epoch ${d.checkpoint_epoch}), replacement ${d.replacement.id}. Replacement score ${fmt(d.scores.graph.replacement, 3)}, completeness ${fmt(d.scores.graph.completeness, 3)}; removal checks on ${local.features ?? 0} features: local model max relative error ${local.max_relative_error?.toExponential(1) ?? "-"}, live policy r ${fmt(live.pearson_r, 3)}, sign agreement ${pct(live.sign_agreement)}.` }));
  const fidelity = d.verification?.fidelity;
  if (fidelity) content.append(el("p", { class: "note", text: `The replacement alone (error nodes dropped) picks city ${fidelity.choice}${fidelity.same_choice ? ", as the policy does" : `, NOT the policy's ${picks}`}: ${pct(fidelity.probability_of_policy_choice)} on the policy's choice, KL ${fmt(fidelity.kl, 3)}. The error nodes carry what it misses.` }));
  const edges = d.verification?.edges, circuit = d.verification?.circuit;
  if (edges?.edges) content.append(el("p", { class: "note", text: `Edge check: the ${edges.edges} strongest edges leaving features, their ${edges.sources} sources scaled in the live policy; the receiving nodes moved as the graph predicts with r ${fmt(edges.scale_0?.total?.pearson_r, 3)} when removed (${fmt(edges["scale_0.9"]?.total?.pearson_r, 3)} when scaled by 0.9), sign agreement ${pct(edges.scale_0?.total?.sign_agreement)}.` }));
  if (circuit) content.append(el("p", { class: "note", text: `Circuit: the decision's margin is ${fmt(circuit.margin_all, 3)} with every feature and ${fmt(circuit.margin_none, 3)} with none (errors held); with only the pruned graph's features the live policy keeps ${pct(circuit.faithfulness)} of that difference, without them ${pct(circuit.complement)}${Math.abs(circuit.margin_all - circuit.margin_none) < 0.1 ? " (a small difference: the shares swing widely)" : ""}.` }));
  if (!faithful(d)) content.append(el("div", { class: "empty not-faithful", text: `Not faithful: removing this graph's most influential features in the live policy moves the decision unlike the graph predicts (r ${fmt(live.pearson_r, 3)} < ${FAITHFUL_R}). Read its edges as the replacement model's, not the policy's.` }));
  if (d.in_words) content.append(el("p", { class: "in-words", text: `In words: ${d.in_words}` }));
  const controls = el("div", { class: "controls" });
  const nodeSlider = el("input", { type: "range", id: "node-threshold", min: "5", max: String(Math.round(100 * d.options.node_threshold)), value: String(Math.round(100 * d.options.node_threshold)) });
  const edgeSlider = el("input", { type: "range", id: "edge-threshold", min: "5", max: String(Math.round(100 * d.options.edge_threshold)), value: String(Math.round(100 * d.options.edge_threshold)) });
  const count = el("span", { id: "decision-count" });
  controls.append(el("label", { text: "node influence kept " }, nodeSlider), el("label", { text: "edge influence kept " }, edgeSlider), count);
  const details = el("div", { id: "details" }, el("p", { class: "note", text: "Hover a node to highlight its paths; click a feature to open its page; click a city on the map to highlight its nodes." }));
  const graph = drawDecisionGraph(d, details);
  const map = drawDecisionMap(d, graph);
  content.append(controls, el("div", { class: "graph-wrap" }, map, graph.holder, details));
  const update = () => {
    const shown = graph.filter(nodeSlider.value / 100, edgeSlider.value / 100);
    count.textContent = `${shown.nodes} nodes, ${shown.edges} edges`;
  };
  nodeSlider.addEventListener("input", update);
  edgeSlider.addEventListener("input", update);
  update();
  const targets = Object.keys(d.top_features[0]?.total_effect || {});
  content.append(el("h3", { text: "Most influential features: predicted total effect on each target (removing the feature changes the target by minus this)" }),
    table(["feature", "influence", ...targets], d.top_features.map((f) => [featureLink(d, f.id), fmt(f.influence, 4), ...targets.map((t) => fmt(f.total_effect[t], 3))])),
    el("p", { class: "note", text: `Attribution rule: ${d.attribution_rule}.` }));
}

function featureLink(d, id) {
  const [, layer, , feature] = id.split(":");
  const dictId = d.replacement.dictionaries[Number(layer)];
  return pageOf(dictId, Number(feature)) ? el("a", { href: featureHash(dictId, Number(feature)), text: id }) : el("span", { text: id });
}

// Columns: inputs, then each encoder layer's features and errors, then the targets; nodes grouped by city. Only
// the nodes and edges within the thresholds are laid out, so a stricter threshold gives a more compact graph.
function drawDecisionGraph(d, details) {
  const holder = el("div", { class: "decision-graph-holder" });
  const graph = { holder, marks: {}, tags: {}, paths: [], city: null };
  const ranked = d.nodes.filter((n) => n.kind === "feature" || n.kind === "error").sort((a, b) => b.influence - a.influence);
  const rankedEdges = [...d.edges].sort((a, b) => b.score - a.score);
  // The fewest nodes (features, errors) and edges, strongest first, carrying that share of the full graph's influence.
  const within = (items, share, total, score) => {
    const kept = new Set();
    let carried = 0;
    for (const item of items) {
      if (carried < share * total) kept.add(item);
      carried += score(item);
    }
    return kept;
  };
  graph.filter = (nodeShare, edgeShare) => {
    const nodes = within(ranked, nodeShare, d.influence_total, (n) => n.influence);
    for (const n of d.nodes) if (n.kind === "input" || n.kind === "target") nodes.add(n);
    const ids = new Set([...nodes].map((n) => n.id));
    const strong = within(rankedEdges, edgeShare, d.edge_score_total, (e) => e.score);
    const edges = d.edges.filter((e) => strong.has(e) && ids.has(e.source) && ids.has(e.target));
    holder.replaceChildren(layout(d, [...nodes], edges, graph, details));
    graph.highlightCity(graph.city);
    return { nodes: nodes.size, edges: edges.length };
  };
  graph.highlightCity = (city) => {
    graph.city = city;
    for (const mark of Object.values(graph.marks)) mark.classList.toggle("dim", city !== null && Number(mark.dataset.city) !== city);
    for (const [id, tag] of Object.entries(graph.tags)) tag.classList.toggle("dim", city !== null && Number(graph.marks[id].dataset.city) !== city);
    for (const { edge, path } of graph.paths) path.classList.toggle("dim", city !== null && cityOf(edge.source) !== city && cityOf(edge.target) !== city);
  };
  return graph;
}

function layout(d, nodes, edges, graph, details) {
  const encoder = d.replacement.layers;  // a glimpse transcoder's features sit in one more column, "layer" encoder
  const layers = encoder + (d.nodes.some((n) => n.kind === "feature" && n.layer === encoder) ? 1 : 0);
  const columnOf = (n) => (n.kind === "input" ? 0 : n.kind === "target" ? layers + 1 : n.layer + 1);
  const columns = Array.from({ length: layers + 2 }, () => []);
  for (const n of nodes) columns[columnOf(n)].push(n);
  for (const column of columns) column.sort((a, b) => a.city - b.city || (a.kind === "error") - (b.kind === "error") || b.influence - a.influence);
  const tallest = Math.max(...columns.map((c) => c.length));
  const row = Math.max(5, Math.min(14, 900 / tallest)), width = 145 * columns.length, height = 40 + row * tallest;
  const svg = el("svg:svg", { id: "graph", class: "decision-graph", width, height, viewBox: `0 0 ${width} ${height}` });
  const titles = ["inputs", ...Array.from({ length: layers }, (_, i) => (i < encoder ? `layer ${i}` : "glimpse")), "targets"];
  const at = {};
  columns.forEach((column, c) => {
    const x = (width * (c + 0.5)) / columns.length;
    svg.append(el("svg:text", { x, y: 14, "text-anchor": "middle", text: titles[c] }));
    column.forEach((n, i) => { at[n.id] = [x, 30 + i * row]; });
  });
  const strongest = Math.max(1e-12, ...edges.map((e) => Math.abs(e.weight)));
  const edgeLayer = el("svg:g"), nodeLayer = el("svg:g"), size = Math.min(4, row / 2);
  graph.paths = [];
  graph.marks = {};
  graph.tags = {};
  for (const e of edges) {
    const [a, b] = [at[e.source], at[e.target]];
    const mid = (a[0] + b[0]) / 2, strength = Math.abs(e.weight) / strongest;
    const path = el("svg:path", { class: "edge", d: `M${a[0]},${a[1]} C${mid},${a[1]} ${mid},${b[1]} ${b[0]},${b[1]}`,
      stroke: e.weight >= 0 ? "#2563eb" : "#dc2626", "stroke-width": 0.4 + 4 * strength, "stroke-opacity": 0.2 + 0.6 * strength });
    path.addEventListener("mousemove", (event) => showTooltip(event, `${e.source} -> ${e.target}: ${fmt(e.weight, 4)}`));
    path.addEventListener("mouseleave", () => { tooltip.hidden = true; });
    graph.paths.push({ edge: e, path });
    edgeLayer.append(path);
  }
  for (const n of nodes) {
    const [x, y] = at[n.id];
    const attrs = { class: `node ${n.kind}`, "data-id": n.id, "data-city": n.city };
    const mark = n.kind === "feature" ? el("svg:circle", { ...attrs, cx: x, cy: y, r: size, fill: "#f0b429" })
      : n.kind === "error" ? el("svg:rect", { ...attrs, x: x - size, y: y - size, width: 2 * size, height: 2 * size, fill: "#9aa5b1" })
      : n.kind === "input" ? el("svg:rect", { ...attrs, x: x - size, y: y - size, width: 2 * size, height: 2 * size, fill: "#7c3aed", transform: `rotate(45 ${x} ${y})` })
      : el("svg:rect", { ...attrs, x: x - 6, y: y - 5, width: 12, height: 10, fill: "#16a34a" });
    const where = n.layer === encoder ? "glimpse" : `L${n.layer}`;
    const label = n.kind === "feature" ? `${where} city ${n.city} #${n.feature}${n.label ? `: ${n.label}` : ""}` : n.kind === "error" ? `error ${where} city ${n.city}` : n.kind === "input" ? `input city ${n.city}` : `target city ${n.city}`;
    if (n.kind === "feature" && n.category) mark.append(el("svg:title", { text: label }));
    if (n.kind === "feature" && n.category && !["unexplained", "rare", "dead"].includes(n.category)) {
      const tag = el("svg:text", { class: "node-tag", x: x + size + 2, y: y + 3, text: TAGS[n.category] || n.category });
      graph.tags[n.id] = tag;
      nodeLayer.append(tag);
    }
    mark.addEventListener("mouseenter", () => highlightPaths(graph, n, true, details, label));
    mark.addEventListener("mouseleave", () => highlightPaths(graph, n, false));
    if (n.kind === "feature") mark.addEventListener("click", () => { location.hash = featureHash(d.replacement.dictionaries[n.layer], n.feature); });
    if (n.kind === "input" || n.kind === "target") nodeLayer.append(el("svg:text", { x: n.kind === "input" ? x - 9 : x + 9, y: y + 4, "text-anchor": n.kind === "input" ? "end" : "start", text: String(n.city) }));
    graph.marks[n.id] = mark;
    nodeLayer.append(mark);
  }
  svg.append(edgeLayer, nodeLayer);
  return svg;
}

// Everything upstream and downstream of a node, along the drawn edges.
function highlightPaths(graph, node, on, details, label) {
  if (!on) {
    graph.highlightCity(graph.city);
    return;
  }
  const drawn = graph.paths.map(({ edge }) => edge);
  const reach = (from, forward) => {
    const seen = new Set([from]), stack = [from];
    while (stack.length) {
      const id = stack.pop();
      for (const e of drawn) {
        const [here, next] = forward ? [e.source, e.target] : [e.target, e.source];
        if (here === id && !seen.has(next)) { seen.add(next); stack.push(next); }
      }
    }
    return seen;
  };
  const down = reach(node.id, true), up = reach(node.id, false);
  const related = new Set([...down, ...up]);
  for (const { edge, path } of graph.paths) path.classList.toggle("dim", !((down.has(edge.source) && down.has(edge.target)) || (up.has(edge.source) && up.has(edge.target))));
  for (const [id, mark] of Object.entries(graph.marks)) mark.classList.toggle("dim", !related.has(id));
  for (const [id, tag] of Object.entries(graph.tags)) tag.classList.toggle("dim", !related.has(id));
  const facts = [`influence on the targets ${fmt(node.influence, 4)}`];
  if (node.kind === "feature") facts.push(`label: ${node.label || "not labelled"}`, `activation ${fmt(node.activation, 3)}`, `pre-activation from biases ${fmt(node.constant, 3)}`);
  if (node.kind === "error") facts.push(`error norm ${fmt(node.norm, 3)}`);
  if (node.kind === "target") facts.push(`value ${fmt(node.value, 3)}${node.against !== null && node.against !== undefined ? ` (score ${node.city} - score ${node.against})` : ""}`);
  details.replaceChildren(el("h3", { text: label }), ...facts.map((f) => el("div", { text: f })),
    el("div", { text: `${up.size - 1} upstream, ${down.size - 1} downstream nodes shown` }));
}

// The instance: the tour so far, the first (square) and current (ringed) city, the candidates sized by probability.
function drawDecisionMap(d, graph) {
  const size = 320, pad = 16, scale = (v) => pad + v * (size - 2 * pad);
  const xy = (c) => [scale(d.instance.locs[c][0]), size - scale(d.instance.locs[c][1])];
  const svg = el("svg:svg", { class: "tsp-map decision-map", width: size, height: size, viewBox: `0 0 ${size} ${size}` });
  if (d.tour.length > 1) svg.append(el("svg:polyline", { points: d.tour.map((c) => xy(c).join(",")).join(" "), fill: "none", stroke: "#3e4c59", "stroke-width": 1.5 }));
  const probability = Object.fromEntries(d.candidates.map((c) => [c.city, c.probability]));
  d.instance.locs.forEach((_, c) => {
    const [x, y] = xy(c);
    const visited = d.tour.includes(c), p = probability[c] || 0;
    const r = visited ? 4 : 4 + 10 * Math.sqrt(p);
    const attrs = { class: "city", "data-city": c, fill: visited ? "#cbd2d9" : c === d.policy_tour[d.step] ? "#16a34a" : "#f0b429", stroke: "#1f2933", "stroke-width": 0.8 };
    const mark = c === d.first ? el("svg:rect", { ...attrs, x: x - 5, y: y - 5, width: 10, height: 10 }) : el("svg:circle", { ...attrs, cx: x, cy: y, r });
    mark.append(el("svg:title", { text: `city ${c}${visited ? ` (visited ${d.tour.indexOf(c) + 1})` : `: probability ${pct(p)}`}` }));
    mark.addEventListener("click", () => graph.highlightCity(graph.city === c ? null : c));
    svg.append(mark);
    if (c === d.current) svg.append(el("svg:circle", { cx: x, cy: y, r: r + 4, fill: "none", stroke: "#dc2626", "stroke-width": 2 }));
    if (p >= 0.01) svg.append(el("svg:text", { x: x + r + 2, y: y - r, "font-size": 11, text: `${c}: ${pct(p, 0)}` }));
  });
  return el("div", { class: "map" }, svg, el("div", { class: "caption", text: `step ${d.step}: current city ${d.current ?? "-"} (ringed), first ${d.first ?? "-"} (square); the policy picks ${d.policy_tour[d.step]} (green)` }));
}

// The city of a node id: F:<layer>:<city>:<feature>, E:<layer>:<city>, I:<city>, T:<city>.
function cityOf(id) {
  const parts = id.split(":");
  return Number(parts[0] === "F" || parts[0] === "E" ? parts[2] : parts[1]);
}

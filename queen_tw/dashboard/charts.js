// Small SVG charts for the dashboard: one line chart over time, drawn with our own code.
// Colours come from style.css (.series-0, .series-1, ...); nothing here sets inline styles,
// which the page's Content-Security-Policy would refuse.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 640;
const HEIGHT = 220;
const MARGIN = { top: 12, right: 16, bottom: 26, left: 56 };

function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) {
    node.setAttribute(name, String(value));
  }
  if (text !== null) node.textContent = text;
  return node;
}

// A readable number for an axis label: 1.2k, 3.4M, 0.25.
export function compact(value) {
  const size = Math.abs(value);
  if (size >= 1e6) return `${(value / 1e6).toFixed(1)}M`;
  if (size >= 1e4) return `${(value / 1e3).toFixed(0)}k`;
  if (size >= 1e3) return `${(value / 1e3).toFixed(1)}k`;
  if (size >= 10 || value === 0) return String(Math.round(value));
  return value.toFixed(2);
}

function clock(date) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// The largest value of every series, rounded up so the top grid line reads well.
function niceMaximum(series) {
  let top = 0;
  for (const line of series) {
    for (const value of line.values) {
      if (Number.isFinite(value) && value > top) top = value;
    }
  }
  if (top === 0) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(top));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * magnitude >= top) return step * magnitude;
  }
  return top;
}

// A line chart: `times` are Dates (one per point), each series {label, values} has one
// number (or null for a gap) per time. Returns a <figure> holding the SVG and its legend.
export function lineChart({ title, unit = "", times, series }) {
  const figure = document.createElement("figure");
  figure.className = "chart";
  const caption = document.createElement("figcaption");
  caption.textContent = unit ? `${title} (${unit})` : title;
  figure.append(caption);
  if (!times.length) {
    const empty = document.createElement("p");
    empty.className = "muted empty";
    empty.textContent = "no data yet";
    figure.append(empty);
    return figure;
  }
  const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const top = niceMaximum(series);
  const first = times[0].getTime();
  const span = Math.max(times[times.length - 1].getTime() - first, 1);
  const x = (time) => MARGIN.left + (times.length === 1 ? plotWidth / 2
    : ((time.getTime() - first) / span) * plotWidth);
  const y = (value) => MARGIN.top + plotHeight - (value / top) * plotHeight;

  const chart = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img",
    "aria-label": caption.textContent, class: "plot" });
  for (const fraction of [0, 0.25, 0.5, 0.75, 1]) {
    const level = y(top * fraction);
    chart.append(svg("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: level,
      y2: level, class: "grid" }));
    chart.append(svg("text", { x: MARGIN.left - 6, y: level + 4, class: "tick y" },
      compact(top * fraction)));
  }
  const labelled = times.length === 1 ? [0] : [0, Math.floor((times.length - 1) / 2),
    times.length - 1];
  for (const index of labelled) {
    // the first and last labels align to their ends so that none is cut at the edges
    const edge = times.length === 1 ? "" : index === 0 ? " start"
      : index === times.length - 1 ? " end" : "";
    chart.append(svg("text", { x: x(times[index]), y: HEIGHT - 8, class: `tick x${edge}` },
      clock(times[index])));
  }
  series.forEach((line, number) => {
    let path = "";
    let drawing = false;
    line.values.forEach((value, index) => {
      if (!Number.isFinite(value)) {
        drawing = false;
        return;
      }
      path += `${drawing ? "L" : "M"}${x(times[index]).toFixed(1)},${y(value).toFixed(1)} `;
      drawing = true;
    });
    if (path) {
      chart.append(svg("path", { d: path.trim(), class: `line series-${number}` }));
    }
    if (times.length === 1 && Number.isFinite(line.values[0])) {
      chart.append(svg("circle", { cx: x(times[0]), cy: y(line.values[0]), r: 3,
        class: `dot series-${number}` }));
    }
  });
  figure.append(chart);

  const legend = document.createElement("ul");
  legend.className = "legend";
  series.forEach((line, number) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `swatch series-${number}`;
    item.append(swatch, document.createTextNode(line.label));
    legend.append(item);
  });
  figure.append(legend);
  return figure;
}

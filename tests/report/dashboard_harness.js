// Runs the dashboard page's own script in Node against a live dashboard server, with a
// minimal DOM holding exactly the page's elements (a wrong id in the script throws), and
// prints what the page shows after its first poll as JSON.
//   node dashboard_harness.js PAGE.html http://127.0.0.1:PORT/
"use strict";
const fs = require("fs");
const [page, base] = process.argv.slice(2);
const html = fs.readFileSync(page, "utf8");

class Element {
  constructor(tag) {
    this.tag = tag; this.children = []; this.attrs = {}; this._text = "";
    this.className = ""; this.title = ""; this.hidden = false; this.dataset = {};
  }
  set textContent(v) { this._text = String(v); this.children = []; }
  get textContent() { return this._text + this.children.map((c) => c.textContent).join(""); }
  appendChild(c) { this.children.push(c); return c; }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  querySelector(tag) {
    let found = this.children.find((c) => c.tag === tag);
    if (!found) found = this.appendChild(new Element(tag));
    return found;
  }
  all(tag) { return this.children.flatMap((c) => [...(c.tag === tag ? [c] : []), ...c.all(tag)]); }
}

const elements = {};
for (const m of html.matchAll(/<(\w+)[^>]*\sid="([^"]+)"[^>]*>/g)) elements[m[2]] = new Element(m[1]);
global.document = {
  getElementById: (id) => elements[id] || null,
  createElement: (tag) => new Element(tag),
  createElementNS: (ns, tag) => new Element(tag),
  body: new Element("body"),
};
const realFetch = fetch;
let polled;
const done = new Promise((resolve) => { polled = resolve; });
global.fetch = async (url, opts) => {
  const response = await realFetch(new URL(url, base), opts);
  const state = await response.clone().json();
  setImmediate(() => polled(state));  // after the page's render
  return response;
};
global.setTimeout = () => 0;  // one poll only

const script = html.match(/<script>([\s\S]*?)<\/script>/)[1];
new Function(script)();

done.then((state) => {
  const text = (id) => elements[id].textContent;
  const paths = (id) => elements[id].all("path").map((p) => p.attrs.d.split(/[ML]/).length - 1);
  const out = {
    state_rounds: state.rounds.length,
    status: text("status"), round: text("round"), accuracy: text("accuracy"),
    loss: text("loss"), clients: text("clients"), epsilon: text("epsilon"),
    epsilon_hidden: elements["epsilon-card"].hidden, title: text("title"), meta: text("meta"),
    acc_points: paths("chart-acc"), time_points: paths("chart-time"),
    bytes_points: paths("chart-bytes"), loss_points: paths("chart-loss"),
    client_bars: elements["chart-clients"].all("rect").length,
    problems: elements["problems"].querySelector("tbody").children.length,
    client_rows: elements["client-metrics"].querySelector("tbody").children.length,
    data_rounds: document.body.dataset.rounds,
  };
  process.stdout.write(JSON.stringify(out) + "\n");
});

/* aistats UI: vanilla JS, no build step, nothing loaded from the network.
 *
 * Routes (hash): #/ activity (filters, sort and page in the hash query), #/capture/<id>,
 * #/sessions, #/sessions/<id>. Live updates come from /api/events (SSE): "record" (a new
 * record), "inflight" (upsert/remove/snapshot), "resync" (refetch). Every text is inserted with
 * textContent: nothing the proxy saw is ever parsed as HTML.
 */
'use strict';

// ---------------------------------------------------------------------------------------------
// small helpers

function h(tag, attrs, ...children) {
  const svg = tag.startsWith('svg:');
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag.slice(4))
                 : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.setAttribute('class', v);
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (sel, root = document) => root.querySelector(sel);
const isNum = v => typeof v === 'number' && Number.isFinite(v);
const nf0 = new Intl.NumberFormat(undefined, {maximumFractionDigits: 0});
const nf1 = new Intl.NumberFormat(undefined, {maximumFractionDigits: 1, minimumFractionDigits: 1});
const nf2 = new Intl.NumberFormat(undefined, {maximumFractionDigits: 2, minimumFractionDigits: 2});

function fmtInt(v) { return isNum(v) ? nf0.format(v) : '–'; }
function fmtTok(v) {
  if (!isNum(v)) return '–';
  if (Math.abs(v) >= 1e6) return nf2.format(v / 1e6) + 'M';
  if (Math.abs(v) >= 1e4) return nf1.format(v / 1e3) + 'k';
  return nf0.format(v);
}
function fmtMs(v) {
  if (!isNum(v)) return '–';
  if (v < 1000) return nf0.format(v) + ' ms';
  if (v < 60000) return nf2.format(v / 1000) + ' s';
  const m = Math.floor(v / 60000), s = Math.round((v % 60000) / 1000);
  return `${m}m ${String(s).padStart(2, '0')}s`;
}
function fmtRate(v) { return isNum(v) ? nf1.format(v) + ' t/s' : '–'; }
function fmtCost(v) {
  if (!isNum(v)) return '–';
  if (v === 0) return '$0';
  if (v < 0.01) return '$' + v.toFixed(5);
  return '$' + v.toFixed(v < 10 ? 4 : 2);
}
function fmtPct(v) { return isNum(v) ? nf1.format(v * 100) + '%' : '–'; }
function fmtBytes(v) {
  if (!isNum(v)) return '–';
  if (v < 1024) return v + ' B';
  if (v < 1 << 20) return nf1.format(v / 1024) + ' KiB';
  return nf1.format(v / 1048576) + ' MiB';
}
function parseTime(s) { const t = Date.parse(s); return Number.isNaN(t) ? null : t; }
function fmtAbs(s) {
  const t = typeof s === 'number' ? s : parseTime(s);
  if (t === null) return '–';
  const d = new Date(t);
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
         `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}
function fmtRel(s) {
  const t = typeof s === 'number' ? s : parseTime(s);
  if (t === null) return '–';
  const d = (Date.now() - t) / 1000;
  if (d < 5) return 'now';
  if (d < 60) return Math.floor(d) + 's ago';
  if (d < 3600) return Math.floor(d / 60) + 'm ago';
  if (d < 86400) return Math.floor(d / 3600) + 'h ago';
  return fmtAbs(t);
}
function statusClass(r) {
  if (!isNum(r.status)) return 'none';
  return Math.floor(r.status / 100) + 'xx';
}
function failed(r) { return !!(r.error || r.error_type) || !isNum(r.status) || r.status >= 400; }

async function copyText(text, button) {
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text); ok = true;
    }
  } catch (e) { ok = false; }
  if (!ok) {  // plain http on a non-loopback address: the old way
    const ta = h('textarea', {class: 'offscreen', readonly: true});
    ta.value = text;
    document.body.append(ta);
    ta.select();
    try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
    ta.remove();
  }
  if (button) {
    const old = button.textContent;
    button.textContent = ok ? 'Copied' : 'Copy failed';
    setTimeout(() => { button.textContent = old; }, 1200);
  }
}

// ---------------------------------------------------------------------------------------------
// API

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, params) {
  const qs = params ? params.toString() : '';
  const r = await fetch(path + (qs ? '?' + qs : ''), {
    headers: {Accept: 'application/json'}, cache: 'no-store', credentials: 'same-origin'});
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) {
    let msg = (body && body.error) || `${r.status} ${r.statusText}`;
    if (r.status === 401) msg = 'This aistats endpoint needs its API token: open /?token=<token> once in this browser.';
    throw new ApiError(r.status, msg);
  }
  return body;
}

function errorBox(e) {
  return h('div', {class: 'banner'}, e instanceof ApiError ? e.message : `Error: ${e.message || e}`);
}

// ---------------------------------------------------------------------------------------------
// state shared by the views

const state = {
  meta: null,
  inflight: new Map(),  // flow id -> {row, at: performance.now() when received}
  seen: {model: new Set(), provider: new Set(), client: new Set()},
  view: null,  // the current view object: {name, update(q), onRecord(r), onInflight(), onResync(), stop()}
};

function remember(r) {
  if (r.model) state.seen.model.add(r.model);
  if (r.response_model) state.seen.model.add(r.response_model);
  if (r.provider) state.seen.provider.add(r.provider);
  if (r.client) state.seen.client.add(r.client);
}

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const i = raw.indexOf('?');
  const path = i < 0 ? raw : raw.slice(0, i);
  const q = new URLSearchParams(i < 0 ? '' : raw.slice(i + 1));
  return {path: path || '/', q};
}

function setHash(path, q) {
  const qs = q.toString();
  const next = '#' + path + (qs ? '?' + qs : '');
  if (location.hash !== next) location.hash = next;
}

// ---------------------------------------------------------------------------------------------
// live events

const live = {
  es: null, connected: false, everConnected: false,
  start() {
    if (this.es) return;
    const es = new EventSource('/api/events');
    this.es = es;
    es.addEventListener('open', () => {
      this.connected = true;
      setLive(true);
      if (this.everConnected) resyncAll();  // anything missed while away
      this.everConnected = true;
    });
    es.addEventListener('error', () => {
      this.connected = false;
      setLive(false);
    });
    es.addEventListener('record', ev => {
      let r; try { r = JSON.parse(ev.data); } catch (e) { return; }
      remember(r);
      if (state.view && state.view.onRecord) state.view.onRecord(r);
    });
    es.addEventListener('inflight', ev => {
      let m; try { m = JSON.parse(ev.data); } catch (e) { return; }
      const now = performance.now();
      if (m.op === 'snapshot') {
        state.inflight.clear();
        for (const row of m.requests || []) state.inflight.set(row.id, {row, at: now});
      } else if (m.op === 'upsert' && m.request) {
        const old = state.inflight.get(m.request.id);
        state.inflight.set(m.request.id, {row: Object.assign(old ? old.row : {}, m.request), at: now});
      } else if (m.op === 'remove') {
        state.inflight.delete(m.id);
      }
      if (state.view && state.view.onInflight) state.view.onInflight();
    });
    es.addEventListener('resync', () => resyncAll());
  },
};

function setLive(on) {
  const el = $('#live');
  if (!el) return;
  el.className = 'live ' + (on ? 'on' : 'off');
  el.textContent = on ? 'live' : 'reconnecting…';
}

async function resyncAll() {
  try {
    const body = await api('/api/inflight');
    const now = performance.now();
    state.inflight.clear();
    for (const row of body.data || []) state.inflight.set(row.id, {row, at: now});
  } catch (e) { /* the next snapshot fixes it */ }
  if (state.view && state.view.onResync) state.view.onResync();
  if (state.view && state.view.onInflight) state.view.onInflight();
}

// ---------------------------------------------------------------------------------------------
// filters (shared by activity and sessions)

const FILTER_KEYS = ['model', 'provider', 'status', 'session', 'consumer', 'client',
                     'start', 'end', 'min_id', 'max_id'];
const MULTI = new Set(['model', 'provider', 'status']);

function filterParams(q) {
  const p = new URLSearchParams();
  for (const k of FILTER_KEYS) for (const v of q.getAll(k)) if (v !== '') p.append(k, v);
  return p;
}

function matchesFilters(r, q) {
  const models = q.getAll('model');
  if (models.length && !models.includes(r.model) && !models.includes(r.response_model)) return false;
  const prov = q.getAll('provider');
  if (prov.length && !prov.includes(r.provider)) return false;
  const st = q.getAll('status');
  if (st.length && !st.includes(statusClass(r))) return false;
  for (const [k, f] of [['session', 'session_id'], ['consumer', 'consumer'], ['client', 'client']]) {
    if (q.get(k) && r[f] !== q.get(k)) return false;
  }
  if (q.get('min_id') && r.id < Number(q.get('min_id'))) return false;
  if (q.get('max_id') && r.id > Number(q.get('max_id'))) return false;
  const t = parseTime(r.start_time);
  const toMs = v => (/^[0-9.]+$/.test(v) ? Number(v) * 1000 : parseTime(v));
  if (q.get('start') && t !== null && t < toMs(q.get('start'))) return false;
  if (q.get('end') && t !== null && t > toMs(q.get('end'))) return false;
  return true;
}

function toLocalInput(v) {  // ISO/epoch -> value of <input type=datetime-local>
  if (!v) return '';
  const t = /^[0-9.]+$/.test(v) ? Number(v) * 1000 : parseTime(v);
  if (t === null) return '';
  const d = new Date(t - new Date(t).getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 19);
}

function filterBar(q, onApply, opts = {}) {
  const datalist = (id, set) => h('datalist', {id}, [...set].sort().map(v => h('option', {value: v})));
  const text = (name, label, list) => h('label', {}, label,
    h('input', {type: 'text', name, value: MULTI.has(name) ? q.getAll(name).join(', ') : (q.get(name) || ''),
                list: list || null, placeholder: MULTI.has(name) ? 'a, b' : '', autocomplete: 'off'}));
  const statuses = ['2xx', '4xx', '5xx', 'none'];
  const chosen = new Set(q.getAll('status'));
  const form = h('form', {class: 'filters panel', onsubmit: ev => {
    ev.preventDefault();
    const fd = new FormData(form);
    const next = new URLSearchParams();
    for (const k of ['model', 'provider']) {
      for (const v of String(fd.get(k) || '').split(',')) if (v.trim()) next.append(k, v.trim());
    }
    for (const s of statuses) if (fd.get('st_' + s)) next.append('status', s);
    for (const k of ['session', 'client', 'consumer', 'min_id', 'max_id']) {
      const v = String(fd.get(k) || '').trim();
      if (v) next.set(k, v);
    }
    for (const k of ['start', 'end']) {
      const v = String(fd.get(k) || '');
      if (v) next.set(k, new Date(v).toISOString());
    }
    for (const k of ['sort', 'order', 'limit']) if (q.get(k)) next.set(k, q.get(k));
    onApply(next);
  }},
    datalist('dl-model', state.seen.model), datalist('dl-provider', state.seen.provider),
    datalist('dl-client', state.seen.client),
    text('model', 'Model', 'dl-model'),
    text('provider', 'Provider', 'dl-provider'),
    h('label', {}, 'Status', h('span', {class: 'status-boxes'}, statuses.map(s =>
      h('label', {}, h('input', {type: 'checkbox', name: 'st_' + s, checked: chosen.has(s)}), s)))),
    opts.noSession ? null : text('session', 'Session'),
    text('client', 'Client', 'dl-client'),
    text('consumer', 'Consumer'),
    h('label', {}, 'From', h('input', {type: 'datetime-local', name: 'start', step: 1, value: toLocalInput(q.get('start'))})),
    h('label', {}, 'To', h('input', {type: 'datetime-local', name: 'end', step: 1, value: toLocalInput(q.get('end'))})),
    h('label', {}, 'ID from', h('input', {type: 'number', class: 'id', name: 'min_id', min: 1, value: q.get('min_id') || ''})),
    h('label', {}, 'ID to', h('input', {type: 'number', class: 'id', name: 'max_id', min: 1, value: q.get('max_id') || ''})),
    h('div', {class: 'row'},
      h('button', {type: 'submit', class: 'primary'}, 'Apply'),
      h('button', {type: 'button', onclick: () => {
        const next = new URLSearchParams();
        for (const k of ['sort', 'order', 'limit']) if (q.get(k)) next.set(k, q.get(k));
        onApply(next);
      }}, 'Clear')),
  );
  const active = FILTER_KEYS.flatMap(k => q.getAll(k).map(v => [k, v]));
  if (active.length) {
    form.append(h('div', {class: 'chips'}, active.map(([k, v]) => h('span', {class: 'chip'},
      `${k}: ${k === 'start' || k === 'end' ? fmtAbs(/^[0-9.]+$/.test(v) ? Number(v) * 1000 : v) : v}`,
      h('button', {type: 'button', title: 'remove this filter', onclick: () => {
        const next = new URLSearchParams(q);
        const rest = next.getAll(k).filter(x => x !== v);
        next.delete(k);
        for (const x of rest) next.append(k, x);
        next.delete('page');
        onApply(next);
      }}, '×')))));
  }
  return form;
}

function withFilter(q, key, value) {
  const next = new URLSearchParams(q);
  if (MULTI.has(key)) { next.delete(key); next.append(key, value); } else next.set(key, value);
  next.delete('page');
  return next;
}

// ---------------------------------------------------------------------------------------------
// charts

function histogram(title, dist, fmt) {
  const box = h('div', {class: 'hist'});
  box.append(h('div', {class: 'title'}, h('span', {}, title),
    h('span', {}, dist ? `${fmtInt(dist.count)} request${dist.count === 1 ? '' : 's'}` : 'no data')));
  if (!dist || !dist.histogram) {
    box.append(h('div', {class: 'muted small'}, 'No value yet for the current filter.'));
    return box;
  }
  const W = 300, H = 90, PAD = 14;
  const hist = dist.histogram;
  const bins = hist.bins || [];
  const max = Math.max(1, ...bins);
  const svg = h('svg:svg', {viewBox: `0 0 ${W} ${H + PAD}`, role: 'img', 'aria-label': title + ' histogram'});
  const bw = W / Math.max(1, bins.length);
  bins.forEach((n, i) => {
    const bh = (n / max) * (H - 4);
    const lo = hist.min + i * hist.bin_size, hi = lo + hist.bin_size;
    const rect = h('svg:rect', {class: 'bar', x: i * bw + 0.5, y: H - bh, width: Math.max(1, bw - 1), height: bh});
    rect.append(h('svg:title', {}, hist.bin_size ? `${fmt(lo)} – ${fmt(hi)}: ${n}` : `${fmt(lo)}: ${n}`));
    svg.append(rect);
  });
  const span = hist.max - hist.min;
  const xOf = v => span > 0 ? Math.min(W, Math.max(0, ((v - hist.min) / span) * W)) : W / 2;
  for (const p of ['p50', 'p95', 'p99']) {
    if (!isNum(dist[p])) continue;
    const x = xOf(dist[p]);
    const line = h('svg:line', {class: 'p ' + p, x1: x, x2: x, y1: 0, y2: H});
    line.append(h('svg:title', {}, `${p}: ${fmt(dist[p])}`));
    svg.append(line);
  }
  svg.append(h('svg:text', {x: 0, y: H + 11}, fmt(hist.min)));
  svg.append(h('svg:text', {x: W, y: H + 11, 'text-anchor': 'end'}, fmt(hist.max)));
  box.append(svg);
  box.append(h('div', {class: 'pcts'},
    h('span', {class: 'pct50'}, `p50 ${fmt(dist.p50)}`),
    h('span', {class: 'pct95'}, `p95 ${fmt(dist.p95)}`),
    h('span', {class: 'pct99'}, `p99 ${fmt(dist.p99)}`)));
  return box;
}

function card(label, value, sub, bad) {
  return h('div', {class: 'card' + (bad ? ' bad' : '')},
    h('div', {class: 'label'}, label), h('div', {class: 'value'}, value),
    sub ? h('div', {class: 'sub'}, sub) : null);
}

function statCards(s) {
  const cached = s.cached_tokens, input = s.input_tokens;
  const hit = isNum(cached) && isNum(input) && input > 0 ? cached / input : null;
  const sp = s.avg_speeds || {};
  const ttft = (s.distributions || {}).ttft_ms;
  return h('div', {class: 'cards', id: 'cards'},
    card('Requests', fmtInt(s.requests)),
    card('Errors', fmtInt(s.errors), s.requests ? fmtPct(s.errors / s.requests) + ' of requests' : null, s.errors > 0),
    card('Input tokens', fmtTok(input), 'cache writes ' + fmtTok(s.cache_creation_tokens)),
    card('Cached tokens', fmtTok(cached), hit !== null ? fmtPct(hit) + ' of input' : null),
    card('Output tokens', fmtTok(s.output_tokens), 'reasoning ' + fmtTok(s.reasoning_tokens)),
    card('Cost', fmtCost(s.cost_usd), isNum(s.cost_usd) ? 'priced requests only' : 'no price known'),
    card('Prefill (server)', fmtRate(sp.prompt_per_second), 'token-weighted'),
    card('Decode (server)', fmtRate(sp.tokens_per_second), 'token-weighted'),
    card('Decode (observed)', fmtRate(sp.observed_tokens_per_second), 'proxy clock, token-weighted'),
    card('TTFT p50', ttft ? fmtMs(ttft.p50) : '–', ttft ? `p95 ${fmtMs(ttft.p95)} · p99 ${fmtMs(ttft.p99)}` : null),
  );
}

// ---------------------------------------------------------------------------------------------
// in-flight table

function inflightPanel() {
  const body = h('tbody');
  const wrap = h('div', {class: 'tablewrap'});
  const panel = h('div', {class: 'panel', id: 'inflight'},
    h('h2', {class: 'inline'}, 'In flight ', h('span', {class: 'muted small', id: 'inflight-count'}, '')),
    h('span', {class: 'muted small', id: 'inflight-none'}, 'No request in flight.'),
    wrap);
  wrap.append(h('table', {class: 'grid'},
      h('thead', {}, h('tr', {}, ['Elapsed', 'Model', 'Request', 'Host', 'Client', 'Session', 'Bytes']
        .map((c, i) => h('th', {class: i === 0 || i === 6 ? 'num' : ''}, c)))),
      body));
  function render() {
    const rows = [...state.inflight.values()].sort((a, b) => (a.row.started || 0) - (b.row.started || 0));
    $('#inflight-count', panel).textContent = rows.length ? `(${rows.length})` : '';
    body.replaceChildren(...rows.map(({row, at}) => h('tr', {dataset: {id: row.id}},
      h('td', {class: 'num elapsed', dataset: {base: row.elapsed_ms || 0, at}}, fmtMs(row.elapsed_ms)),
      h('td', {}, row.model || '–'),
      h('td', {class: 'mono'}, `${row.method || ''} ${row.path || ''}`),
      h('td', {}, row.host || '–'),
      h('td', {}, row.client || '–'),
      h('td', {class: 'trunc'}, row.session_id || '–'),
      h('td', {class: 'num'}, fmtBytes(row.bytes)))));
    wrap.hidden = !rows.length;  // one line when nothing is in flight
    $('#inflight-none', panel).hidden = !!rows.length;
  }
  function tick() {  // the elapsed time moves between snapshots
    const now = performance.now();
    for (const td of panel.querySelectorAll('td.elapsed')) {
      td.textContent = fmtMs(Number(td.dataset.base) + (now - Number(td.dataset.at)));
    }
  }
  render();
  return {panel, render, tick};
}

// ---------------------------------------------------------------------------------------------
// the activity table

const ACTIVITY_COLUMNS = [
  {label: 'Time', sort: 'time', cell: r => h('td', {title: fmtAbs(r.start_time)}, fmtRel(r.start_time))},
  {label: 'ID', sort: 'id', num: true, cell: r => h('td', {class: 'num mono'}, r.id)},
  {label: 'Model', sort: 'model', cell: (r, q) => h('td', {class: 'trunc', title: r.response_model && r.response_model !== r.model ? `answered by ${r.response_model}` : null},
      r.model ? h('a', {class: 'filterlink', href: '#/?' + withFilter(q, 'model', r.model), title: 'filter on this model'}, r.model) : '–',
      r.response_model && r.response_model !== r.model ? h('div', {class: 'sub'}, '→ ' + r.response_model) : null)},
  {label: 'Provider / client', sort: 'provider', cell: r => h('td', {title: r.user_agent || null},
      r.provider || '–', h('div', {class: 'sub'}, r.client || r.api || ''))},
  {label: 'Status', sort: 'status', cell: r => h('td', {class: 'status status-' + statusClass(r), title: r.error || r.parse_error || null},
      isNum(r.status) ? r.status : (r.error_type || 'no response'),
      r.error ? h('div', {class: 'sub trunc'}, r.error_type && r.error_type !== String(r.status) ? r.error_type : 'error') :
        (r.finish_reason ? h('div', {class: 'sub'}, r.finish_reason) : null))},
  {label: 'Cached', sort: 'cached_tokens', num: true, title: 'prompt tokens read from cache',
    cell: r => h('td', {class: 'num', title: isNum(r.cached_tokens) && r.input_tokens ? fmtPct(r.cached_tokens / r.input_tokens) + ' of the prompt' : null}, fmtInt(r.cached_tokens))},
  {label: 'Prompt', sort: 'input_tokens', num: true, title: 'all prompt tokens, cached included',
    cell: r => h('td', {class: 'num'}, fmtInt(r.input_tokens))},
  {label: 'Generated', sort: 'output_tokens', num: true, title: 'output tokens, reasoning included',
    cell: r => h('td', {class: 'num', title: isNum(r.reasoning_tokens) ? `${fmtInt(r.reasoning_tokens)} reasoning` : null}, fmtInt(r.output_tokens))},
  {label: 'TTFT', sort: 'ttft_ms', num: true, title: 'time to the first generated token (streams)',
    cell: r => h('td', {class: 'num'}, fmtMs(r.ttft_ms))},
  {label: 'Prefill', sort: 'prompt_per_second', num: true, title: 'prompt speed reported by the server',
    cell: r => h('td', {class: 'num'}, fmtRate(r.prompt_per_second))},
  {label: 'Decode', sort: 'tokens_per_second', num: true, title: 'generation speed reported by the server',
    cell: r => h('td', {class: 'num'}, fmtRate(r.tokens_per_second))},
  {label: 'Observed', sort: 'observed_tokens_per_second', num: true, title: 'generation speed on the proxy\'s own clock',
    cell: r => h('td', {class: 'num'}, fmtRate(r.observed_tokens_per_second))},
  {label: 'Duration', sort: 'duration_ms', num: true, cell: r => h('td', {class: 'num'}, fmtMs(r.duration_ms))},
  {label: 'Cost', sort: 'cost_usd', num: true, cell: r => h('td', {class: 'num', title: r.cost_source || null}, fmtCost(r.cost_usd))},
  {label: 'Session', sort: 'session_id', cell: (r, q) => h('td', {class: 'trunc'},
      r.session_id ? h('a', {class: 'filterlink', href: '#/sessions/' + encodeURIComponent(r.session_id), title: 'open this session'}, r.session_id) : '–')},
  {label: 'Capture', cell: r => h('td', {},
      r.has_capture ? h('a', {href: '#/capture/' + r.id, class: 'capture-link'}, 'View') : h('span', {class: 'muted', title: 'no capture kept (off, not captured, or evicted)'}, '–'))},
];

function recordTable(rows, q, onSort, opts = {}) {
  const sort = q.get('sort') || opts.defaultSort || 'id';
  const order = q.get('order') || 'desc';
  const keys = new Set((state.meta && state.meta.sort_keys) || []);
  const head = h('tr', {}, ACTIVITY_COLUMNS.map(c => {
    const sortable = onSort && c.sort && keys.has(c.sort);
    const mark = sortable && sort === c.sort ? (order === 'asc' ? ' ▲' : ' ▼') : '';
    return h('th', {class: [c.num ? 'num' : '', sortable ? 'sortable' : '', mark ? 'sorted' : ''].join(' '),
                    title: c.title || (sortable ? 'sort' : null), dataset: {sort: c.sort || ''},
                    onclick: sortable ? () => onSort(c.sort, sort === c.sort && order === 'desc' ? 'asc' : 'desc') : null},
      c.label + mark);
  }));
  const body = h('tbody', {id: 'activity-rows'}, rows.map(r => recordRow(r, q)));
  if (!rows.length) body.append(h('tr', {}, h('td', {colspan: ACTIVITY_COLUMNS.length, class: 'muted'}, 'No request matches.')));
  return h('div', {class: 'tablewrap'}, h('table', {class: 'grid', id: 'activity'}, h('thead', {}, head), body));
}

function recordRow(r, q, fresh) {
  return h('tr', {class: (failed(r) ? 'failed' : '') + (fresh ? ' fresh' : ''), dataset: {id: r.id}},
    ACTIVITY_COLUMNS.map(c => c.cell(r, q)));
}

function pager(page, total, q, onPage) {
  const limit = Number(q.get('limit') || 25);
  const pages = Math.max(1, page.total_pages || 1);
  const cur = page.page || 1;
  const sel = h('select', {onchange: ev => onPage(1, Number(ev.target.value))},
    [10, 25, 50, 100, 250, 500, 1000].map(n => h('option', {value: n, selected: n === limit}, `${n} / page`)));
  return h('div', {class: 'pager'},
    h('button', {disabled: cur <= 1, onclick: () => onPage(1)}, '« First'),
    h('button', {disabled: cur <= 1, onclick: () => onPage(cur - 1)}, '‹ Prev'),
    h('span', {}, `Page ${cur} of ${pages} · ${fmtInt(total)} rows`),
    h('button', {disabled: cur >= pages, onclick: () => onPage(cur + 1)}, 'Next ›'),
    h('button', {disabled: cur >= pages, onclick: () => onPage(pages)}, 'Last »'),
    sel);
}

// ---------------------------------------------------------------------------------------------
// view: activity

function activityView() {
  const root = h('div', {});
  const inflight = inflightPanel();
  let q = new URLSearchParams();
  let seq = 0;
  let rows = [];
  let liveRows = new Map();  // records from SSE not yet seen in a fetched page
  let refreshTimer = null, lastRefresh = 0;
  const timer = setInterval(() => { inflight.tick(); }, 200);
  const relTimer = setInterval(() => { if (rows.length) renderTable(); }, 15000);

  const parts = {filters: h('div'), cards: h('div'), hists: h('div'), table: h('div'), pager: h('div'), exports: h('div'), error: h('div')};
  root.append(h('h1', {}, 'Activity'), inflight.panel, parts.error, parts.filters, parts.cards, parts.hists,
    h('h2', {}, 'Requests'), parts.table, parts.pager, parts.exports);

  function go(next) { setHash('/', next); }

  function renderTable(page) {
    const shown = liveFirst();
    parts.table.replaceChildren(recordTable(shown, q, (sort, order) => {
      const next = new URLSearchParams(q); next.set('sort', sort); next.set('order', order); next.delete('page'); go(next);
    }));
    if (page) {
      parts.pager.replaceChildren(pager(page, page.total, q, (p, limit) => {
        const next = new URLSearchParams(q);
        next.set('page', p);
        if (limit) next.set('limit', limit);
        go(next);
      }));
    }
  }

  function onFirstPageNewestFirst() {
    const sort = q.get('sort') || 'id', order = q.get('order') || 'desc';
    return Number(q.get('page') || 1) === 1 && order === 'desc' && (sort === 'id' || sort === 'time');
  }

  function liveFirst() {  // records pushed live but not in the fetched page yet
    if (!onFirstPageNewestFirst() || !liveRows.size) return rows;
    const have = new Set(rows.map(r => r.id));
    const extra = [...liveRows.values()].filter(r => !have.has(r.id)).sort((a, b) => b.id - a.id);
    const limit = Number(q.get('limit') || 25);
    return extra.concat(rows).slice(0, limit);
  }

  async function refresh() {
    const my = ++seq;
    lastRefresh = Date.now();
    const fp = filterParams(q);
    const ap = new URLSearchParams(fp);
    for (const k of ['sort', 'order', 'page', 'limit']) if (q.get(k)) ap.set(k, q.get(k));
    try {
      const [page, stats] = await Promise.all([api('/api/activity', ap), api('/api/stats', fp)]);
      if (my !== seq) return;
      parts.error.replaceChildren();
      rows = page.data || [];
      rows.forEach(remember);
      const have = new Set(rows.map(r => r.id));
      for (const id of [...liveRows.keys()]) {
        if (have.has(id) || Date.now() - liveRows.get(id)._at > 10000) liveRows.delete(id);
      }
      parts.cards.replaceChildren(statCards(stats));
      const d = stats.distributions || {};
      parts.hists.replaceChildren(h('div', {class: 'hists'},
        histogram('Time to first token', d.ttft_ms, fmtMs),
        histogram('Prefill speed (server)', d.prompt_per_second, fmtRate),
        histogram('Decode speed (server)', d.tokens_per_second, fmtRate),
        histogram('Decode speed (observed)', d.observed_tokens_per_second, fmtRate)));
      renderTable(page);
      renderExports();
    } catch (e) {
      if (my !== seq) return;
      parts.error.replaceChildren(errorBox(e));
    }
  }

  function renderExports() {
    const p = filterParams(q);
    for (const k of ['sort', 'order']) if (q.get(k)) p.set(k, q.get(k));
    const qs = p.toString();
    parts.exports.replaceChildren(h('div', {class: 'row small'},
      h('span', {class: 'muted'}, 'Export the current filter:'),
      h('a', {href: '/api/export.jsonl' + (qs ? '?' + qs : ''), download: '', id: 'export-jsonl'}, 'JSON Lines'),
      h('a', {href: '/api/export.md' + (qs ? '?' + qs : ''), download: '', id: 'export-md'}, 'Markdown'),
      h('span', {class: 'muted'}, `(at most ${fmtInt((state.meta && state.meta.max_export_rows) || 100000)} rows)`)));
  }

  function schedule() {  // at most one refetch a second, the last event always followed
    if (refreshTimer) return;
    const wait = Math.max(400, 1000 - (Date.now() - lastRefresh));
    refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, wait);
  }

  return {
    name: 'activity', root,
    update(nq) {
      q = nq;
      parts.filters.replaceChildren(filterBar(q, next => go(next)));
      liveRows = new Map();
      refresh();
    },
    onRecord(r) {
      if (!matchesFilters(r, q)) return;
      if (onFirstPageNewestFirst()) {
        r._at = Date.now();
        liveRows.set(r.id, r);
        const tbody = $('#activity-rows', root);
        if (tbody && !tbody.querySelector(`tr[data-id="${r.id}"]`)) {
          const empty = tbody.querySelector('td[colspan]');
          if (empty) empty.parentElement.remove();
          tbody.prepend(recordRow(r, q, true));
          const limit = Number(q.get('limit') || 25);
          while (tbody.children.length > limit) tbody.lastElementChild.remove();
        }
      }
      schedule();
    },
    onInflight() { inflight.render(); },
    onResync() { refresh(); },
    stop() { clearInterval(timer); clearInterval(relTimer); if (refreshTimer) clearTimeout(refreshTimer); },
  };
}

// ---------------------------------------------------------------------------------------------
// view: capture

function codeBox(text, label) {
  const pre = h('pre', {}, text);
  const copy = h('button', {type: 'button', class: 'copy', title: 'copy to the clipboard'}, 'Copy');
  copy.addEventListener('click', () => copyText(text, copy));
  return h('div', {class: 'codebox'}, h('div', {class: 'tools'}, copy), label ? h('div', {class: 'muted small'}, label) : null, pre);
}

function bodyText(text, b64) {
  if (typeof text === 'string') return {text, binary: false};
  if (typeof b64 === 'string') {
    try {
      const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
      return {text: new TextDecoder('utf-8', {fatal: true}).decode(bytes), binary: false};
    } catch (e) {
      return {text: b64, binary: true};
    }
  }
  return null;
}

function prettyBody(text, ctype) {
  const t = text.trim();
  if (t.startsWith('{') || t.startsWith('[')) {
    try { return JSON.stringify(JSON.parse(t), null, 2); } catch (e) { /* not JSON */ }
  }
  if ((ctype || '').includes('event-stream') || /^(data|event):/m.test(t)) {
    // each event's data pretty-printed
    return t.split(/\r?\n\r?\n/).map(block => block.split(/\r?\n/).map(line => {
      const m = /^data:\s?(.*)$/.exec(line);
      if (!m) return line;
      try { return 'data: ' + JSON.stringify(JSON.parse(m[1]), null, 2); } catch (e) { return line; }
    }).join('\n')).join('\n\n');
  }
  if ((ctype || '').includes('ndjson')) {
    return t.split(/\r?\n/).map(line => { try { return JSON.stringify(JSON.parse(line), null, 2); } catch (e) { return line; } }).join('\n');
  }
  return null;
}

function bodyPanel(title, text, b64, ctype) {
  const body = bodyText(text, b64);
  const box = h('div', {class: 'panel'}, h('h3', {}, title));
  if (!body) { box.append(h('div', {class: 'muted'}, 'Not captured.')); return box; }
  if (body.binary) { box.append(h('div', {class: 'muted small'}, `Binary data (${ctype || 'unknown type'}), base64:`), codeBox(body.text)); return box; }
  const pretty = prettyBody(body.text, ctype);
  const holder = h('div');
  const tabs = h('div', {class: 'tabs'});
  const show = which => {
    holder.replaceChildren(codeBox(which === 'pretty' && pretty !== null ? pretty : body.text));
    for (const b of tabs.children) b.classList.toggle('active', b.dataset.tab === which);
  };
  if (pretty !== null) {
    tabs.append(h('button', {type: 'button', dataset: {tab: 'pretty'}, onclick: () => show('pretty')}, 'Pretty'),
                h('button', {type: 'button', dataset: {tab: 'raw'}, onclick: () => show('raw')}, 'Raw'));
    box.append(tabs);
  }
  box.append(holder);
  show(pretty !== null ? 'pretty' : 'raw');
  return box;
}

function headersPanel(title, headers) {
  const box = h('div', {class: 'panel'}, h('h3', {}, title));
  if (!headers) { box.append(h('div', {class: 'muted'}, 'Not captured.')); return box; }
  box.append(h('div', {class: 'kv mono'}, Object.entries(headers).flatMap(([k, v]) => [h('div', {class: 'k'}, k), h('div', {}, String(v))])));
  return box;
}

function prettyArgs(args) {
  if (typeof args !== 'string') return JSON.stringify(args, null, 2);
  try { return JSON.stringify(JSON.parse(args), null, 2); } catch (e) { return args; }
}

function renderPart(p) {
  switch (p.type) {
    case 'text':
      return h('div', {class: 'part text'}, h('pre', {}, p.text || ''));
    case 'reasoning':
      return h('details', {class: 'part reasoning'}, h('summary', {}, `Reasoning (${fmtInt((p.text || '').length)} chars)`), h('pre', {}, p.text || ''));
    case 'tool_call':
      return h('div', {class: 'part tool_call'},
        h('div', {class: 'label'}, 'Tool call ', h('b', {class: 'mono'}, p.name || '?'), p.id ? h('span', {class: 'mono'}, `  ${p.id}`) : null),
        h('pre', {}, prettyArgs(p.arguments)));
    case 'tool_result':
      return h('div', {class: 'part tool_result' + (p.error ? ' error' : '')},
        h('div', {class: 'label'}, p.error ? 'Tool result (error) ' : 'Tool result ', p.name ? h('b', {class: 'mono'}, p.name) : null, p.id ? h('span', {class: 'mono'}, `  ${p.id}`) : null),
        h('pre', {}, p.content || ''));
    case 'image': {
      const src = typeof p.content === 'string' ? p.content : '';
      return h('div', {class: 'part image'}, h('div', {class: 'label'}, `Image ${p.name || ''}`),
        src.startsWith('data:image/') ? h('img', {src, alt: 'image from the request'}) :
          h('div', {class: 'mono small'}, src ? src.slice(0, 300) : '(data left out)'));
    }
    default:
      return h('div', {class: 'part other'}, h('div', {class: 'label'}, `${p.name || 'other'}`), h('pre', {}, p.text || ''));
  }
}

function messageBox(m, i, mark) {
  return h('div', {class: `msg role-${(m.role || 'unknown').toLowerCase()}` + (mark === 'new' ? ' is-new' : ''), dataset: {index: i}},
    h('div', {class: 'head'}, h('span', {class: 'role'}, m.role || '?'), h('span', {}, `#${i + 1}`),
      mark === 'new' ? h('span', {class: 'pill new'}, 'new this turn') : null,
      mark === 'answer' ? h('span', {class: 'pill'}, 'previous answer') : null),
    (m.parts || []).map(renderPart));
}

function conversationView(conv, diff) {
  const root = h('div', {class: 'conversation'});
  if (!conv) return root;
  if (diff && diff.previous_id) {
    const bits = [];
    if (isNum(diff.common_prefix)) {
      const echoed = isNum(diff.previous_answer_at) ? 1 : 0;
      const n = diff.new_messages - echoed;
      bits.push(`${n} new message${n === 1 ? '' : 's'}${echoed ? ' (after the previous answer)' : ''} since `);
    } else {
      bits.push('Previous request of this session: ');
    }
    const note = h('div', {class: 'diffnote' + (diff.rewritten ? ' warn' : ''), id: 'diffnote'}, bits,
      h('a', {href: '#/capture/' + diff.previous_id}, `#${diff.previous_id}`),
      !diff.previous_has_capture ? ' (its capture is gone, so no comparison)' : '',
      diff.rewritten ? ` — earlier history changed: only the first ${diff.common_prefix} of its ${diff.previous_messages} messages are the same (compaction or edits)` : '',
      diff.system_changed ? ' — the system prompt changed' : '',
      diff.tools_changed ? ' — the tool definitions changed' : '');
    root.append(note);
  }
  if (conv.system) {
    const texts = Array.isArray(conv.system) ? conv.system : [conv.system];
    const total = texts.reduce((n, t) => n + String(t).length, 0);
    root.append(h('details', {class: 'box', open: total < 1500},
      h('summary', {}, `System prompt (${fmtInt(total)} chars)`),
      texts.map(t => h('pre', {}, String(t)))));
  }
  if (conv.tools && conv.tools.length) {
    root.append(h('details', {class: 'box'},
      h('summary', {}, `Tools (${conv.tools.length}): ${conv.tools.map(t => t.name).join(', ').slice(0, 200)}`),
      conv.tools.map(t => h('div', {class: 'part tool_call'},
        h('div', {class: 'label'}, h('b', {class: 'mono'}, t.name || '?')),
        t.description ? h('pre', {}, t.description) : null,
        t.parameters ? h('details', {}, h('summary', {}, 'parameters'), h('pre', {}, prettyArgs(t.parameters))) : null))));
  }
  const msgs = conv.messages || [];
  const firstNew = diff && isNum(diff.common_prefix) ? diff.common_prefix : null;
  const markOf = i => (diff && diff.previous_answer_at === i) ? 'answer' : (firstNew !== null && i >= firstNew ? 'new' : null);
  // long contexts: older history collapsed, the last turns and everything new shown
  const KEEP = 4;
  let cut = msgs.length > KEEP + 4 ? msgs.length - KEEP : 0;
  if (firstNew !== null && firstNew < cut) cut = Math.max(0, Math.min(cut, firstNew - (diff.previous_answer_at === firstNew ? 0 : 1)));
  const list = h('div', {class: 'messages'});
  root.append(h('h3', {}, `Messages (${msgs.length})`), list);
  if (cut > 0) {
    const more = h('div', {class: 'collapsed-note'}, h('button', {type: 'button', id: 'show-history', onclick: () => {
      more.replaceWith(...msgs.slice(0, cut).map((m, i) => messageBox(m, i, markOf(i))));
    }}, `Show ${cut} earlier message${cut === 1 ? '' : 's'}`));
    list.append(more);
  }
  msgs.slice(cut).forEach((m, j) => list.append(messageBox(m, cut + j, markOf(cut + j))));
  const resp = conv.response;
  root.append(h('h3', {}, 'Response'));
  if (!resp) {
    root.append(h('div', {class: 'muted'}, 'No response body captured.'));
  } else {
    const box = h('div', {class: 'msg role-assistant answer', id: 'answer'},
      h('div', {class: 'head'}, h('span', {class: 'role'}, 'assistant'),
        resp.model ? h('span', {class: 'mono'}, resp.model) : null,
        resp.finish_reason ? h('span', {class: 'pill'}, `finish: ${resp.finish_reason}`) : null,
        resp.error ? h('span', {class: 'pill err'}, 'error') : null));
    if (resp.reasoning) box.append(renderPart({type: 'reasoning', text: resp.reasoning}));
    if (resp.text) box.append(renderPart({type: 'text', text: resp.text}));
    for (const c of resp.tool_calls || []) box.append(renderPart(Object.assign({type: 'tool_call'}, c)));
    if (!resp.text && !(resp.tool_calls || []).length && !resp.reasoning) box.append(h('div', {class: 'muted'}, '(no text in the response)'));
    if (resp.error) box.append(h('div', {class: 'error'}, typeof resp.error === 'string' ? resp.error : JSON.stringify(resp.error)));
    root.append(box);
    if (resp.usage) root.append(h('details', {class: 'box'}, h('summary', {}, 'Usage as the provider reported it'), h('pre', {}, JSON.stringify(resp.usage, null, 2))));
  }
  if (conv.notes && conv.notes.length) {
    root.append(h('details', {class: 'box'}, h('summary', {}, `Notes (${conv.notes.length})`), conv.notes.map(n => h('div', {class: 'small'}, n))));
  }
  return root;
}

function recordSummary(r) {
  if (!r) return h('div');
  const kv = [
    ['Model', r.model + (r.response_model && r.response_model !== r.model ? ` → ${r.response_model}` : '')],
    ['Provider / API', `${r.provider || '–'} / ${r.api || '–'}`],
    ['Request', `${r.method} ${r.scheme}://${r.host}:${r.port}${r.path}`],
    ['Status', (isNum(r.status) ? r.status : 'no response') + (r.error_type ? ` (${r.error_type})` : '') + (r.error ? ` — ${r.error}` : '')],
    ['Client', `${r.client || '–'}${r.user_agent ? ` (${r.user_agent})` : ''}`],
    ['Session / consumer', `${r.session_id || '–'} / ${r.consumer || '–'}`],
    ['Started', fmtAbs(r.start_time)],
    ['Tokens', `prompt ${fmtInt(r.input_tokens)} (cached ${fmtInt(r.cached_tokens)}, cache writes ${fmtInt(r.cache_creation_tokens)}) · output ${fmtInt(r.output_tokens)} (reasoning ${fmtInt(r.reasoning_tokens)}) · usage ${r.usage_source}`],
    ['Timing', `TTFB ${fmtMs(r.ttfb_ms)} · TTFT ${fmtMs(r.ttft_ms)} · decode ${fmtMs(r.decode_ms)} · total ${fmtMs(r.duration_ms)}${r.stream ? ` · ${fmtInt(r.chunks)} chunks` : ''}`],
    ['Speeds', `prefill ${fmtRate(r.prompt_per_second)} · decode ${fmtRate(r.tokens_per_second)} (server) · ${fmtRate(r.observed_tokens_per_second)} (observed)`],
    ['Finish reason', r.finish_reason || '–'],
    ['Cost', `${fmtCost(r.cost_usd)}${r.cost_source ? ` (${r.cost_source})` : ''}`],
  ];
  if (r.parse_error) kv.push(['Parse problem', r.parse_error]);
  return h('div', {class: 'panel kv', id: 'record-summary'}, kv.flatMap(([k, v]) => [h('div', {class: 'k'}, k), h('div', {}, v)]));
}

function captureView() {
  const root = h('div', {});
  let tab = 'conversation';
  return {
    name: 'capture', root,
    async update(q, id) {
      root.replaceChildren(h('p', {class: 'muted'}, `Loading capture #${id}…`));
      let cap = null, rec = null, err = null;
      try { cap = await api('/api/captures/' + encodeURIComponent(id)); rec = cap.record; } catch (e) { err = e; }
      if (!cap) {
        try { rec = await api('/api/records/' + encodeURIComponent(id)); } catch (e) { /* gone too */ }
      }
      const nav = h('div', {class: 'row small'}, h('a', {href: '#/'}, '← Activity'),
        rec && rec.session_id ? h('a', {href: '#/sessions/' + encodeURIComponent(rec.session_id)}, `Session ${rec.session_id}`) : null);
      root.replaceChildren(nav, h('h1', {}, `Capture #${id} `, h('span', {class: 'muted mono small'}, cap ? `${cap.method || ''} ${cap.req_path || ''}` : '')));
      if (rec) root.append(recordSummary(rec));
      if (!cap) {
        root.append(err && err.status === 404 ? h('div', {class: 'banner'}, `Capture #${id} not found: it was never captured, or it was evicted (captures are bounded by aistats_captures_mb).`) : errorBox(err));
        return;
      }
      if (cap.omitted && cap.omitted.length) root.append(h('div', {class: 'muted small'}, 'Left out: ' + cap.omitted.join('; ')));
      const tabs = h('div', {class: 'tabs'});
      const holder = h('div');
      const panes = {
        conversation: () => cap.conversation ? conversationView(cap.conversation, cap.previous_turn) :
          h('div', {class: 'muted'}, cap.conversation_error || 'No conversation could be read from this exchange.'),
        request: () => bodyPanel('Request body', cap.req_body, cap.req_body_base64, (cap.req_headers || {})['Content-Type'] || (cap.req_headers || {})['content-type']),
        response: () => bodyPanel('Response body', cap.resp_body, cap.resp_body_base64, cap.resp_content_type),
        headers: () => h('div', {}, headersPanel('Request headers', cap.req_headers), headersPanel('Response headers', cap.resp_headers)),
      };
      const labels = {conversation: 'Conversation', request: 'Request', response: 'Response', headers: 'Headers'};
      const show = which => {
        tab = which;
        holder.replaceChildren(panes[which]());
        for (const b of tabs.children) b.classList.toggle('active', b.dataset.tab === which);
      };
      for (const k of Object.keys(panes)) tabs.append(h('button', {type: 'button', dataset: {tab: k}, onclick: () => show(k)}, labels[k]));
      root.append(tabs, holder);
      show(tab);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// view: sessions

const SESSION_COLUMNS = [
  {label: 'Session', sort: 'session_id', cell: s => h('td', {class: 'trunc'}, h('a', {href: '#/sessions/' + encodeURIComponent(s.session_id), class: 'session-link'}, s.session_id))},
  {label: 'Requests', sort: 'requests', num: true, cell: s => h('td', {class: 'num'}, fmtInt(s.requests))},
  {label: 'Input', sort: 'input_tokens', num: true, cell: s => h('td', {class: 'num'}, fmtTok(s.input_tokens))},
  {label: 'Cached', sort: 'cached_tokens', num: true, cell: s => h('td', {class: 'num'}, fmtTok(s.cached_tokens))},
  {label: 'Cache writes', sort: 'cache_creation_tokens', num: true, cell: s => h('td', {class: 'num'}, fmtTok(s.cache_creation_tokens))},
  {label: 'Output', sort: 'output_tokens', num: true, cell: s => h('td', {class: 'num'}, fmtTok(s.output_tokens))},
  {label: 'Reasoning', sort: 'reasoning_tokens', num: true, cell: s => h('td', {class: 'num'}, fmtTok(s.reasoning_tokens))},
  {label: 'Cache hit', sort: 'cache_hit_ratio', num: true, cell: s => h('td', {class: 'num'}, fmtPct(s.cache_hit_ratio))},
  {label: 'Errors', sort: 'errors', num: true, cell: s => h('td', {class: 'num' + (s.errors ? ' error' : '')}, fmtInt(s.errors))},
  {label: 'Cost', sort: 'cost_usd', num: true, cell: s => h('td', {class: 'num'}, fmtCost(s.cost_usd))},
  {label: 'Models', cell: s => h('td', {class: 'trunc'}, (s.models || []).join(', ') || '–')},
  {label: 'Clients', cell: s => h('td', {class: 'trunc'}, (s.clients || []).join(', ') || '–')},
  {label: 'First seen', sort: 'first_seen', cell: s => h('td', {title: fmtAbs(s.first_seen)}, fmtRel(s.first_seen))},
  {label: 'Last seen', sort: 'last_seen', cell: s => h('td', {title: fmtAbs(s.last_seen)}, fmtRel(s.last_seen))},
];

function sessionsView() {
  const root = h('div', {});
  let q = new URLSearchParams();
  let seq = 0, timer = null, last = 0;
  const parts = {filters: h('div'), error: h('div'), table: h('div'), pager: h('div')};
  root.append(h('h1', {}, 'Sessions'), h('p', {class: 'muted small'}, 'Requests grouped by their session header (aistats_session_headers, e.g. x-session-id).'),
    parts.error, parts.filters, parts.table, parts.pager);
  const go = next => setHash('/sessions', next);
  async function refresh() {
    const my = ++seq;
    last = Date.now();
    const p = filterParams(q);
    for (const k of ['sort', 'order', 'page', 'limit']) if (q.get(k)) p.set(k, q.get(k));
    try {
      const page = await api('/api/sessions', p);
      if (my !== seq) return;
      parts.error.replaceChildren();
      const sort = q.get('sort') || 'last_seen', order = q.get('order') || 'desc';
      const keys = new Set((state.meta && state.meta.session_sort_keys) || []);
      const head = h('tr', {}, SESSION_COLUMNS.map(c => {
        const sortable = c.sort && keys.has(c.sort);
        const mark = sortable && sort === c.sort ? (order === 'asc' ? ' ▲' : ' ▼') : '';
        return h('th', {class: [c.num ? 'num' : '', sortable ? 'sortable' : '', mark ? 'sorted' : ''].join(' '),
          onclick: sortable ? () => { const n = new URLSearchParams(q); n.set('sort', c.sort); n.set('order', sort === c.sort && order === 'desc' ? 'asc' : 'desc'); n.delete('page'); go(n); } : null}, c.label + mark);
      }));
      const body = h('tbody', {id: 'session-rows'}, (page.data || []).map(s => h('tr', {dataset: {session: s.session_id}}, SESSION_COLUMNS.map(c => c.cell(s)))));
      if (!(page.data || []).length) body.append(h('tr', {}, h('td', {colspan: SESSION_COLUMNS.length, class: 'muted'}, 'No session yet: requests need a session header.')));
      parts.table.replaceChildren(h('div', {class: 'tablewrap'}, h('table', {class: 'grid', id: 'sessions'}, h('thead', {}, head), body)));
      parts.pager.replaceChildren(pager(page, page.total, q, (pg, limit) => { const n = new URLSearchParams(q); n.set('page', pg); if (limit) n.set('limit', limit); go(n); }));
    } catch (e) {
      if (my === seq) parts.error.replaceChildren(errorBox(e));
    }
  }
  return {
    name: 'sessions', root,
    update(nq) { q = nq; parts.filters.replaceChildren(filterBar(q, go, {noSession: true})); refresh(); },
    onRecord(r) {
      if (!r.session_id || timer) return;
      timer = setTimeout(() => { timer = null; refresh(); }, Math.max(400, 1000 - (Date.now() - last)));
    },
    onResync() { refresh(); },
    stop() { if (timer) clearTimeout(timer); },
  };
}

function timeline(reqs) {
  const W = 1000, H = 160, TOP = 10, BOTTOM = 18;
  const n = reqs.length;
  const box = h('div', {class: 'panel timeline', id: 'timeline'});
  box.append(h('div', {class: 'legend'},
    h('span', {}, h('span', {class: 'sw cached'}), 'cached input'),
    h('span', {}, h('span', {class: 'sw input'}), 'uncached input'),
    h('span', {}, h('span', {class: 'sw output'}), 'output'),
    h('span', {}, h('span', {class: 'sw ttft'}), 'TTFT (right scale)'),
    h('span', {}, h('span', {class: 'sw err'}), 'error')));
  if (!n) { box.append(h('div', {class: 'muted'}, 'No request.')); return box; }
  const tot = r => (r.input_tokens || 0) + (r.output_tokens || 0);
  const maxTok = Math.max(1, ...reqs.map(tot));
  const ttfts = reqs.map(r => r.ttft_ms).filter(isNum);
  const maxT = Math.max(1, ...ttfts);
  const bw = W / n;
  const y = v => TOP + (H - TOP - BOTTOM) * (1 - v / maxTok);
  const svg = h('svg:svg', {viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'session timeline'});
  const pts = [];
  reqs.forEach((r, i) => {
    const x = i * bw, w = Math.max(1, bw * 0.8);
    const cached = r.cached_tokens || 0, input = r.input_tokens || 0, out = r.output_tokens || 0;
    const segs = [['cached', 0, cached], ['input', cached, input], ['output', input, input + out]];
    for (const [cls, a, b] of segs) {
      if (b > a) svg.append(h('svg:rect', {class: cls, x, y: y(b), width: w, height: Math.max(0.5, y(a) - y(b))}));
    }
    if (failed(r)) svg.append(h('svg:rect', {class: 'errmark', x, y: H - BOTTOM + 2, width: w, height: 5}));
    if (isNum(r.ttft_ms)) pts.push([x + w / 2, TOP + (H - TOP - BOTTOM) * (1 - r.ttft_ms / maxT)]);
    const hit = h('svg:rect', {class: 'hit', x, y: 0, width: bw, height: H, dataset: {id: r.id}});
    hit.append(h('svg:title', {}, `#${r.id} ${fmtAbs(r.start_time)}\n${r.model || ''} · status ${isNum(r.status) ? r.status : 'none'}\n` +
      `input ${fmtInt(input)} (cached ${fmtInt(r.cached_tokens)}, ${input ? fmtPct(cached / input) : '–'}) · output ${fmtInt(out)}\n` +
      `TTFT ${fmtMs(r.ttft_ms)} · duration ${fmtMs(r.duration_ms)}` + (r.error ? `\n${r.error}` : '')));
    if (r.has_capture) hit.addEventListener('click', () => { location.hash = '#/capture/' + r.id; });
    svg.append(hit);
  });
  if (pts.length > 1) svg.append(h('svg:polyline', {class: 'ttft', points: pts.map(p => p.join(',')).join(' ')}));
  for (const [px, py] of pts) svg.append(h('svg:circle', {class: 'ttft', cx: px, cy: py, r: 2.5}));
  svg.append(h('svg:text', {x: 2, y: TOP + 2}, fmtTok(maxTok) + ' tok'));
  svg.append(h('svg:text', {x: W - 2, y: TOP + 2, 'text-anchor': 'end'}, fmtMs(maxT)));
  box.append(svg);
  return box;
}

function sessionView() {
  const root = h('div', {});
  let sid = null, timer = null, seq = 0;
  async function refresh() {
    const my = ++seq;
    try {
      const s = await api('/api/sessions/' + encodeURIComponent(sid));
      if (my !== seq) return;
      const reqs = s.requests || [];
      reqs.forEach(remember);
      const q = new URLSearchParams();
      root.replaceChildren(
        h('div', {class: 'row small'}, h('a', {href: '#/sessions'}, '← Sessions'),
          h('a', {href: '#/?' + new URLSearchParams({session: sid})}, 'these requests in Activity')),
        h('h1', {}, 'Session ', h('span', {class: 'mono'}, sid)),
        h('div', {class: 'cards'},
          card('Requests', fmtInt(s.request_count), s.requests_truncated ? `newest ${reqs.length} shown` : null),
          card('Input tokens', fmtTok(s.input_tokens), 'cache writes ' + fmtTok(s.cache_creation_tokens)),
          card('Cached tokens', fmtTok(s.cached_tokens), 'hit ratio ' + fmtPct(s.cache_hit_ratio)),
          card('Output tokens', fmtTok(s.output_tokens), 'reasoning ' + fmtTok(s.reasoning_tokens)),
          card('Errors', fmtInt(s.errors), null, s.errors > 0),
          card('Cost', fmtCost(s.cost_usd)),
          card('First seen', fmtRel(s.first_seen), fmtAbs(s.first_seen)),
          card('Last seen', fmtRel(s.last_seen), fmtAbs(s.last_seen))),
        h('div', {class: 'muted small'}, `Models: ${(s.models || []).join(', ') || '–'} · clients: ${(s.clients || []).join(', ') || '–'}`),
        h('h2', {}, 'Timeline (one bar per request, in order)'),
        timeline(reqs),
        h('h2', {}, 'Requests'),
        recordTable(reqs.slice().reverse(), q, null));
    } catch (e) {
      if (my !== seq) return;
      root.replaceChildren(h('div', {class: 'row small'}, h('a', {href: '#/sessions'}, '← Sessions')),
        e.status === 404 ? h('div', {class: 'banner'}, `Session ${sid} not found (no stored request has it).`) : errorBox(e));
    }
  }
  return {
    name: 'session', root,
    update(q, id) { sid = id; refresh(); },
    onRecord(r) {
      if (r.session_id !== sid || timer) return;
      timer = setTimeout(() => { timer = null; refresh(); }, 800);
    },
    onResync() { refresh(); },
    stop() { if (timer) clearTimeout(timer); },
  };
}

// ---------------------------------------------------------------------------------------------
// router

const VIEWS = {activity: activityView, capture: captureView, sessions: sessionsView, session: sessionView};

function route() {
  const {path, q} = parseHash();
  let name = null, arg = null, m;
  if (path === '/' || path === '') name = 'activity';
  else if ((m = /^\/capture\/([^/]+)$/.exec(path))) { name = 'capture'; arg = decodeURIComponent(m[1]); }
  else if (path === '/sessions') name = 'sessions';
  else if ((m = /^\/sessions\/(.+)$/.exec(path))) { name = 'session'; arg = decodeURIComponent(m[1]); }
  for (const a of document.querySelectorAll('header nav a')) {
    a.classList.toggle('active', a.dataset.nav === (name === 'session' ? 'sessions' : name === 'capture' ? '' : name));
  }
  const main = $('#main');
  if (!name) {
    if (state.view && state.view.stop) state.view.stop();
    state.view = null;
    main.replaceChildren(h('h1', {}, 'Not found'), h('p', {}, h('a', {href: '#/'}, 'Back to the activity')));
    return;
  }
  if (!state.view || state.view.name !== name) {
    if (state.view && state.view.stop) state.view.stop();
    state.view = VIEWS[name]();
    main.replaceChildren(state.view.root);
    window.scrollTo(0, 0);
  }
  if (name === 'activity' && state.view.onInflight) state.view.onInflight();
  state.view.update(q, arg);
}

async function boot() {
  try {
    state.meta = await api('/api/meta');
  } catch (e) {
    $('#main').replaceChildren(errorBox(e));
    if (e.status === 401) return;
    state.meta = {sort_keys: [], session_sort_keys: []};
  }
  if (state.meta && state.meta.store === false) {
    $('#main').replaceChildren(h('div', {class: 'banner'}, 'The activity store is off (aistats_ui=false): only /metrics is served.'));
    return;
  }
  window.addEventListener('hashchange', route);
  route();
  live.start();
}

document.addEventListener('DOMContentLoaded', boot);

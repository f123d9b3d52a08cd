// The Nox audit console. Plain JavaScript, no build step, no library.
//
// Rules this file keeps (the page's Content-Security-Policy enforces the
// first two):
// - no inline script or style, no eval, no string turned into code;
// - every value from the server reaches the page as text (textContent,
//   createTextNode, attribute values), never as HTML;
// - the token lives in sessionStorage and leaves the page only as an
//   Authorization header of fetch(), never in a URL.
'use strict';

(function () {
  const TOKEN_KEY = 'nox-console-token';
  const SVG = 'http://www.w3.org/2000/svg';
  const FILTERS = ['user_id', 'session_id', 'request_id', 'action_type', 'action_category',
    'endpoint', 'status_code', 'success', 'quota_violation', 'client_ip', 'start_date',
    'end_date', 'search'];
  const ACTION_TYPES = ['file_read', 'file_write', 'file_delete', 'code_exec', 'audit_export',
    'admin_read', 'admin_write', 'quota_check', 'auth', 'api_call'];
  const ACTION_CATEGORIES = ['filesystem', 'execution', 'admin', 'quota', 'auth', 'general'];
  // The detail view lists these first, in this order, then any other field.
  const FIELD_ORDER = ['id', 'timestamp', 'user_id', 'user_name', 'session_id', 'request_id',
    'http_method', 'endpoint', 'route', 'action_type', 'action_category', 'status_code',
    'success', 'client_ip', 'user_agent', 'request_size', 'response_size', 'response_time_ms',
    'cpu_time_ms', 'memory_peak_mb', 'file_path', 'file_size_bytes', 'files_affected',
    'command_type', 'command_text', 'exit_code', 'stdout_size', 'stderr_size',
    'quota_violation', 'quota_consumed', 'quota_remaining', 'metadata', 'error_details'];
  const PAGE_SIZE = 50;
  const LIVE_ROWS = 500;
  const INTEGRITY_REFRESH_MS = 2000;

  const $ = (id) => document.getElementById(id);

  // ---- DOM helpers: text only ----

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'class') node.className = value;
      else if (name === 'text') node.textContent = value;
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === 'string' ? document.createTextNode(child) : child);
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === 'class') node.setAttribute('class', value);
      else node.setAttribute(name, String(value));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function text(value) {
    if (value === null || value === undefined) return '';
    if (typeof value === 'object') return JSON.stringify(value);
    return String(value);
  }

  function setStatus(id, message, isError) {
    const node = $(id);
    node.textContent = message || '';
    node.classList.toggle('error', Boolean(isError));
  }

  function age(fromIso) {
    if (!fromIso) return '';
    const seconds = Math.max(0, Math.round((Date.now() - Date.parse(fromIso)) / 1000));
    if (seconds < 120) return seconds + ' s ago';
    if (seconds < 7200) return Math.round(seconds / 60) + ' min ago';
    if (seconds < 172800) return Math.round(seconds / 3600) + ' h ago';
    return Math.round(seconds / 86400) + ' days ago';
  }

  function shortTime(iso) {
    // "2026-12-07T19:34:10.123456Z" → "2026-12-07 19:34:10.123"
    if (!iso) return '';
    const match = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2}(?:\.\d{1,3})?)/.exec(iso);
    return match ? match[1] + ' ' + match[2] : iso;
  }

  // ---- The token and the API ----

  let token = null;
  let me = null;

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail ? status + ': ' + detail : 'HTTP ' + status);
      this.status = status;
    }
  }

  function headers(accept) {
    return { Authorization: 'Bearer ' + token, Accept: accept || 'application/json' };
  }

  // One call to the API with the bearer token. A 401 signs out.
  async function call(path, params, options) {
    const query = params && params.toString();
    const response = await fetch(path + (query ? '?' + query : ''), {
      headers: headers(options && options.accept),
      cache: 'no-store',
      credentials: 'omit',
      signal: options && options.signal,
    });
    if (response.status === 401) {
      signOut('The server refused the token (expired, revoked or mistyped): sign in again.');
      throw new ApiError(401, 'signed out');
    }
    if (!response.ok) {
      let detail = '';
      try { detail = (await response.json()).detail || ''; } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, detail || response.statusText);
    }
    return response;
  }

  async function callJson(path, params) {
    return (await call(path, params)).json();
  }

  // ---- Sign in and out ----

  async function signIn(candidate) {
    token = candidate;
    let user;
    try {
      user = await callJson('/me');
    } catch (error) {
      token = null;
      throw error;
    }
    if (user.role !== 'auditor' && user.role !== 'admin') {
      token = null;
      throw new Error('This token belongs to a user with the role "' + user.role
        + '": the console needs an auditor or an admin.');
    }
    sessionStorage.setItem(TOKEN_KEY, candidate);
    me = user;
    $('whoami').textContent = 'Signed in as ' + user.name + ' (' + user.role + ')';
    $('whoami').hidden = false;
    $('sign-out').hidden = false;
    for (const node of document.querySelectorAll('.admin-only')) node.hidden = user.role !== 'admin';
    $('signin').hidden = true;
    $('app').hidden = false;
    loadUserOptions();
    route();
  }

  function signOut(message) {
    resetLive();
    stopIntegrityRefresh();
    search.loaded = false;
    search.generation += 1;
    currentView = null;
    sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    me = null;
    $('app').hidden = true;
    $('whoami').hidden = true;
    $('sign-out').hidden = true;
    $('signin').hidden = false;
    $('token').value = '';
    $('signin-error').textContent = message || '';
    for (const id of ['records', 'live-records', 'users', 'activity-table', 'chains', 'verify-chains']) {
      clear($(id).tBodies[0]);
    }
    clear($('detail-fields'));
    if ($('detail').open) $('detail').close();
    $('token').focus();
  }

  // ---- Views ----

  const VIEWS = ['search', 'live', 'activity', 'integrity', 'users'];
  let currentView = null;

  function route() {
    const name = location.hash.replace(/^#/, '');
    show(VIEWS.includes(name) ? name : 'search');
  }

  function show(name) {
    if (!token) return;
    const previous = currentView;
    currentView = name;
    for (const view of VIEWS) $('view-' + view).hidden = view !== name;
    for (const link of document.querySelectorAll('nav.views a')) {
      if (link.dataset.view === name) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
    $('filters-panel').hidden = name !== 'search' && name !== 'live';
    if (previous === 'live' && name !== 'live') stopLive();
    if (previous === 'integrity' && name !== 'integrity') stopIntegrityRefresh();
    if (name === 'search' && !search.loaded) runSearch();
    if (name === 'live' && !live.paused) startLive();
    if (name === 'activity') loadActivity();
    if (name === 'integrity') startIntegrityRefresh();
    if (name === 'users') loadUsers();
  }

  // ---- Filters ----

  function filterParams() {
    const form = $('filters');
    const params = new URLSearchParams();
    for (const name of FILTERS) {
      const value = form.elements[name].value.trim();
      if (value !== '') params.set(name, value);
    }
    return params;
  }

  function setFilters(values) {
    const form = $('filters');
    for (const name of FILTERS) form.elements[name].value = values[name] || '';
  }

  function countFilters() {
    const count = Array.from(filterParams().keys()).length;
    $('filters-count').textContent = count ? count + ' applied' : '';
  }

  function filtersChanged() {
    countFilters();
    search.loaded = false;
    if (currentView === 'search') runSearch();
    if (currentView === 'live') {
      resetLive();
      if (!live.paused) startLive();
    }
  }

  // Shows the records matching exactly these filters (from a record's links
  // or the users list).
  function searchFor(values) {
    setFilters(values);
    countFilters();
    if ($('detail').open) $('detail').close();
    search.loaded = false;
    if (location.hash !== '#search') location.hash = '#search';
    else runSearch();
    $('search-title').focus();
  }

  // ---- Record rows ----

  function recordRow(record) {
    const open = el('button', { type: 'button', class: 'link', title: 'Open this record' },
      shortTime(record.timestamp));
    open.addEventListener('click', () => openDetail(record));
    const status = text(record.status_code);
    const row = el('tr', { 'data-id': record.id, 'data-request-id': record.request_id, class: record.success === false ? 'failed' : null },
      el('td', { class: 'time' }, open),
      el('td', { class: 'user', title: text(record.user_id) }, text(record.user_name || record.user_id || '(none)')),
      el('td', { class: 'narrow-hide' }, text(record.http_method)),
      el('td', { class: 'endpoint', title: text(record.endpoint) }, text(record.endpoint)),
      el('td', { class: 'action' }, text(record.action_type)),
      el('td', { class: 'status-code' + (record.quota_violation ? ' quota' : '') }, status),
      el('td', { class: 'narrow-hide num' }, text(record.response_time_ms)),
      el('td', { class: 'narrow-hide' }, text(record.client_ip)),
      el('td', { class: 'narrow-hide agent', title: text(record.user_agent) }, text(record.user_agent)));
    return row;
  }

  // ---- Search ----

  const search = { cursor: null, params: null, generation: 0, loaded: false, rows: 0 };

  async function runSearch() {
    search.generation += 1;
    search.params = filterParams();
    search.cursor = null;
    search.rows = 0;
    search.loaded = true;
    clear($('records').tBodies[0]);
    $('load-more').hidden = true;
    await loadPage(search.generation);
  }

  async function loadPage(generation) {
    const params = new URLSearchParams(search.params);
    params.set('page_size', String(PAGE_SIZE));
    if (search.cursor) params.set('cursor', search.cursor);
    setStatus('search-status', 'Loading…');
    $('load-more').disabled = true;
    try {
      const page = await callJson('/admin/audit/logs', params);
      if (generation !== search.generation) return;
      const body = $('records').tBodies[0];
      for (const record of page.logs) body.append(recordRow(record));
      search.rows += page.logs.length;
      search.cursor = page.next_cursor;
      $('load-more').hidden = !page.has_next;
      setStatus('search-status', search.rows === 0 ? 'No record matches these filters.'
        : search.rows + (page.has_next ? ' records shown; more match.' : ' records: all that match.'));
    } catch (error) {
      if (generation === search.generation) setStatus('search-status', error.message, true);
    } finally {
      $('load-more').disabled = false;
    }
  }

  // ---- Detail ----

  let detailRecord = null;

  function fieldValue(value) {
    if (value !== null && typeof value === 'object') {
      return el('pre', { class: 'json' }, JSON.stringify(value, null, 2));
    }
    if (value === null || value === undefined) return el('span', { class: 'muted' }, 'null');
    return el('span', { class: 'value' }, String(value));
  }

  function openDetail(record) {
    detailRecord = record;
    const list = $('detail-fields');
    clear(list);
    const names = FIELD_ORDER.filter((n) => n in record)
      .concat(Object.keys(record).filter((n) => !FIELD_ORDER.includes(n)).sort());
    for (const name of names) {
      list.append(el('div', { 'data-field': name }, el('dt', {}, name), el('dd', {}, fieldValue(record[name]))));
    }
    $('detail-title').textContent = 'Record ' + text(record.id);
    $('detail-user').hidden = !record.user_id;
    $('detail-session').hidden = !record.session_id;
    $('detail-request').hidden = !record.request_id;
    const dialog = $('detail');
    if (!dialog.open) dialog.showModal();
    $('detail-close').focus();
  }

  // ---- Live tail ----

  const live = { controller: null, lastId: null, paused: false, running: false, retry: null, rows: 0 };

  function resetLive() {
    stopLive();
    live.lastId = null;
    live.rows = 0;
    clear($('live-records').tBodies[0]);
  }

  function stopLive() {
    clearTimeout(live.retry);
    live.retry = null;
    if (live.controller) live.controller.abort();
    live.controller = null;
    live.running = false;
  }

  function updateLiveButton() {
    const button = $('live-toggle');
    button.textContent = live.paused ? 'Resume' : 'Pause';
    button.setAttribute('aria-pressed', live.paused ? 'true' : 'false');
  }

  // The tail's state ("connecting", "live", "paused", "retrying") is also
  // the status line's data-state, for tests and styles.
  function liveStatus(state, message) {
    setStatus('live-status', message, state === 'retrying');
    $('live-status').dataset.state = state;
  }

  // Reads the stream with fetch (an EventSource cannot send the bearer
  // header) and parses the server-sent events itself.
  async function startLive() {
    if (live.running || !token) return;
    stopLive();
    live.running = true;
    const controller = new AbortController();
    live.controller = controller;
    liveStatus('connecting', live.lastId === null ? 'Connecting…' : 'Resuming after record ' + live.lastId + '…');
    let restartAfter = 2000;
    try {
      if (live.lastId === null) {
        // Start from the chain's head, so that a pause before the first
        // record still resumes without a gap.
        const status = await callJson('/admin/audit/status');
        const head = status.chains && status.chains.audit_actions;
        if (controller.signal.aborted) return;
        if (head && typeof head.seq === 'number') live.lastId = head.seq;
      }
      const params = filterParams();
      if (live.lastId !== null) params.set('after', String(live.lastId));
      const response = await call('/admin/audit/stream', params,
        { accept: 'text/event-stream', signal: controller.signal });
      liveStatus('live', 'Live: new records appear at the top.');
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          if (liveEvent(block) === 'lagged') restartAfter = 0;
        }
      }
      if (restartAfter !== 0) liveStatus('connecting', 'The server closed the stream; reconnecting…');
    } catch (error) {
      if (controller.signal.aborted) return;
      if (error.status === 401) return;
      liveStatus('retrying', 'Live tail: ' + error.message + '. Retrying…');
      restartAfter = error.status === 404 || error.status === 403 ? 10000 : 2000;
    }
    if (live.controller !== controller) return;
    live.running = false;
    live.controller = null;
    if (!live.paused && currentView === 'live') {
      live.retry = setTimeout(startLive, restartAfter);
    }
  }

  // One event block: returns its type.
  function liveEvent(block) {
    let id = null;
    let type = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line === '' || line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'id') id = value;
      else if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    }
    if (data.length === 0) return type;
    let payload;
    try { payload = JSON.parse(data.join('\n')); } catch (_) { return type; }
    if (type === 'record') {
      if (id !== null && /^\d+$/.test(id)) live.lastId = Number(id);
      else if (typeof payload.seq === 'number') live.lastId = payload.seq;
      const body = $('live-records').tBodies[0];
      body.insertBefore(recordRow(payload), body.firstChild);
      live.rows += 1;
      while (body.rows.length > LIVE_ROWS) body.deleteRow(body.rows.length - 1);
    } else if (type === 'lagged') {
      if (payload && payload.last_id !== null && payload.last_id !== undefined) live.lastId = payload.last_id;
      liveStatus('connecting', 'The tail fell behind; catching up from record ' + text(live.lastId) + '…');
    }
    return type;
  }

  // ---- Activity ----

  let activityGeneration = 0;

  async function loadActivity() {
    const generation = ++activityGeneration;
    const days = Number($('activity-days').value);
    const user = $('activity-user').value;
    const params = new URLSearchParams({ days: String(days) });
    if (user) params.set('user_id', user);
    setStatus('activity-status', 'Loading…');
    try {
      const { summaries } = await callJson('/admin/audit/daily-summaries', params);
      if (generation !== activityGeneration) return;
      const perDay = new Map();
      for (const row of summaries) {
        const day = perDay.get(row.summary_date) || { actions: 0, failures: 0, quota: 0 };
        day.actions += row.total_actions;
        day.failures += row.failed_actions;
        day.quota += row.quota_violations;
        perDay.set(row.summary_date, day);
      }
      const series = [];
      const today = new Date();
      for (let back = days; back >= 0; back -= 1) {
        const date = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - back));
        const key = date.toISOString().slice(0, 10);
        series.push(Object.assign({ date: key }, perDay.get(key) || { actions: 0, failures: 0, quota: 0 }));
      }
      const totals = series.reduce((t, d) => ({
        actions: t.actions + d.actions, failures: t.failures + d.failures, quota: t.quota + d.quota,
      }), { actions: 0, failures: 0, quota: 0 });
      $('total-actions').textContent = String(totals.actions);
      $('total-failures').textContent = String(totals.failures);
      $('total-quota').textContent = String(totals.quota);
      drawChart(series, totals);
      const body = $('activity-table').tBodies[0];
      clear(body);
      for (const day of series.slice().reverse()) {
        if (day.actions === 0 && day.failures === 0 && day.quota === 0) continue;
        body.append(el('tr', { 'data-date': day.date },
          el('th', { scope: 'row' }, day.date),
          el('td', { class: 'num actions' }, String(day.actions)),
          el('td', { class: 'num failures' }, String(day.failures)),
          el('td', { class: 'num quota' }, String(day.quota))));
      }
      const who = user ? 'one user' : 'all users';
      setStatus('activity-status', 'The last ' + days + ' days (UTC), ' + who + '.');
    } catch (error) {
      if (generation === activityGeneration) setStatus('activity-status', error.message, true);
    }
  }

  function drawChart(series, totals) {
    const chart = $('chart');
    clear(chart);
    const width = 960;
    const height = 240;
    const left = 40;
    const bottom = 24;
    const max = Math.max(1, ...series.map((d) => d.actions));
    const slot = (width - left) / series.length;
    const bar = Math.max(1, slot / 3.5);
    const plot = height - bottom - 8;
    const root = svg('svg', {
      viewBox: '0 0 ' + width + ' ' + height, role: 'img', class: 'chart-svg',
      'aria-label': 'Per day over ' + series.length + ' days: ' + totals.actions + ' actions, '
        + totals.failures + ' failures, ' + totals.quota + ' quota violations',
    });
    for (const fraction of [0, 0.5, 1]) {
      const y = 8 + plot * (1 - fraction);
      root.append(svg('line', { x1: left, x2: width, y1: y, y2: y, class: 'grid' }));
      const label = svg('text', { x: left - 4, y: y + 4, class: 'axis', 'text-anchor': 'end' });
      label.textContent = String(Math.round(max * fraction));
      root.append(label);
    }
    series.forEach((day, i) => {
      const x = left + i * slot + (slot - bar * 3) / 2;
      [['actions', day.actions], ['failures', day.failures], ['quota', day.quota]].forEach(([kind, n], k) => {
        const h = (n / max) * plot;
        const rect = svg('rect', { x: x + k * bar, y: 8 + plot - h, width: Math.max(0.5, bar - 0.5), height: h, class: kind });
        const title = svg('title', {});
        title.textContent = day.date + ': ' + n + ' ' + kind;
        rect.append(title);
        root.append(rect);
      });
      const every = Math.ceil(series.length / 8);
      if (i % every === 0 || i === series.length - 1) {
        const label = svg('text', { x: left + i * slot + slot / 2, y: height - 6, class: 'axis', 'text-anchor': 'middle' });
        label.textContent = day.date.slice(5);
        root.append(label);
      }
    });
    chart.append(root);
  }

  // ---- Integrity ----

  let integrityTimer = null;
  let integrityBusy = false;

  function startIntegrityRefresh() {
    stopIntegrityRefresh();
    loadIntegrity();
    integrityTimer = setInterval(loadIntegrity, INTEGRITY_REFRESH_MS);
  }

  function stopIntegrityRefresh() {
    clearInterval(integrityTimer);
    integrityTimer = null;
  }

  async function loadIntegrity() {
    if (integrityBusy || !token) return;
    integrityBusy = true;
    try {
      const [status, signed] = await Promise.all([
        callJson('/admin/audit/status'),
        callJson('/admin/audit/checkpoints', new URLSearchParams({ limit: '20' })),
      ]);
      renderVerification(status.verification);
      const newest = new Map();
      for (const checkpoint of signed.checkpoints || []) {
        if (!newest.has(checkpoint.chain)) newest.set(checkpoint.chain, checkpoint);
      }
      const body = $('chains').tBodies[0];
      clear(body);
      const chains = status.chains || {};
      for (const chain of Object.keys(chains).sort()) {
        const head = chains[chain];
        const checkpoint = newest.get(chain);
        body.append(el('tr', { 'data-chain': chain },
          el('th', { scope: 'row' }, chain),
          el('td', { class: 'num head-seq' }, text(head.seq)),
          el('td', { class: 'hash', title: text(head.row_hash) }, text(head.row_hash).slice(0, 16) + '…'),
          el('td', { class: 'num checkpoint-seq' }, checkpoint ? text(checkpoint.seq) : 'none'),
          el('td', { class: 'checkpoint-at' }, checkpoint ? shortTime(checkpoint.timestamp) : ''),
          el('td', { class: 'checkpoint-age' }, checkpoint ? age(checkpoint.timestamp) : '')));
      }
      $('public-key').textContent = text(signed.public_key);
      const writer = $('writer');
      clear(writer);
      for (const name of ['audit_system', 'mode', 'database_status', 'queue_depth', 'rows_written',
        'spool_rows', 'rows_reduced', 'rejected_rows', 'streams_open', 'last_write_at', 'last_checkpoint_at',
        'last_error']) {
        const value = name.endsWith('_at') ? shortTime(status[name]) : text(status[name]);
        writer.append(el('div', {}, el('dt', {}, name), el('dd', { 'data-field': name }, value || '–')));
      }
      setStatus('integrity-status', 'Updated ' + new Date().toISOString().slice(11, 19) + ' UTC; refreshes every '
        + INTEGRITY_REFRESH_MS / 1000 + ' s while shown.');
    } catch (error) {
      setStatus('integrity-status', error.message, true);
    } finally {
      integrityBusy = false;
    }
  }

  function renderVerification(verification) {
    const summary = $('verify-summary');
    const body = $('verify-chains').tBodies[0];
    clear(body);
    $('verify-chains').hidden = !verification || !(verification.chains || []).length;
    if (!verification) {
      summary.textContent = 'This server does not report continuous verification.';
      summary.dataset.outcome = 'unknown';
      return;
    }
    const outcome = verification.outcome || 'never';
    summary.dataset.outcome = outcome;
    const words = {
      ok: 'Verified: every chain checked out.',
      failed: 'FAILED: the trail does not verify.',
      error: 'Error: the verification could not run to the end.',
      never: 'No verification has run yet.',
      unknown: 'Unknown: the verification results could not be read.',
    };
    let line = words[outcome] || outcome;
    if (verification.last_run_at) line += ' Last run ' + shortTime(verification.last_run_at) + ' UTC (' + age(verification.last_run_at) + ').';
    if (verification.interval_secs) line += ' Runs every ' + verification.interval_secs + ' s.';
    else line += ' Continuous verification is off (NOX_AUDIT_VERIFY_SECS).';
    summary.textContent = line;
    for (const chain of verification.chains || []) {
      const problem = [chain.problem_kind, chain.problem].filter(Boolean).join(': ');
      body.append(el('tr', { 'data-chain': text(chain.chain), class: chain.outcome === 'ok' ? null : 'failed' },
        el('th', { scope: 'row' }, text(chain.chain)),
        el('td', { class: 'num' }, text(chain.from_seq) + '–' + text(chain.to_seq)),
        el('td', { class: 'outcome' }, text(chain.outcome)),
        el('td', { class: 'num first-bad-seq' }, text(chain.first_bad_seq)),
        el('td', { class: 'problem' }, problem),
        el('td', {}, shortTime(chain.finished_at))));
    }
  }

  // ---- Users ----

  let users = [];

  async function loadUserOptions() {
    try {
      users = (await callJson('/admin/users')).users || [];
    } catch (_) {
      users = [];
    }
    const list = $('user-options');
    clear(list);
    const select = $('activity-user');
    while (select.options.length > 1) select.remove(1);
    for (const user of users) {
      list.append(el('option', { value: user.id }, user.name));
      select.append(el('option', { value: user.id }, user.name));
    }
  }

  async function loadUsers() {
    setStatus('users-status', 'Loading…');
    try {
      const [list, summaries] = await Promise.all([
        callJson('/admin/users'),
        callJson('/admin/audit/daily-summaries', new URLSearchParams({ days: '30' })),
      ]);
      users = list.users || [];
      const activity = new Map();
      for (const row of summaries.summaries || []) {
        if (!row.user_id) continue;
        const sums = activity.get(row.user_id) || { actions: 0, failures: 0 };
        sums.actions += row.total_actions;
        sums.failures += row.failed_actions;
        activity.set(row.user_id, sums);
      }
      const body = $('users').tBodies[0];
      clear(body);
      const admin = me && me.role === 'admin';
      for (const user of users) {
        const sums = activity.get(user.id) || { actions: 0, failures: 0 };
        const records = el('button', { type: 'button', class: 'link' }, 'Records');
        records.addEventListener('click', () => searchFor({ user_id: user.id }));
        const cell = el('td', {}, records);
        if (admin) {
          const tokens = el('button', { type: 'button', class: 'link', 'aria-expanded': 'false' }, 'Tokens');
          tokens.addEventListener('click', () => toggleTokens(tokens, user));
          cell.append(' ', tokens);
        }
        body.append(el('tr', { 'data-user': user.id },
          el('th', { scope: 'row', title: user.id }, user.name),
          el('td', {}, text(user.role)),
          el('td', { class: 'narrow-hide' }, text(user.tier)),
          el('td', {}, user.is_active ? 'yes' : 'no'),
          el('td', { class: 'num' }, String(sums.actions)),
          el('td', { class: 'num' }, String(sums.failures)),
          el('td', { class: 'narrow-hide' }, shortTime(user.created_at)),
          cell));
      }
      setStatus('users-status', users.length + ' users.');
    } catch (error) {
      setStatus('users-status', error.message, true);
    }
  }

  async function tokensOf(user) {
    return (await callJson('/admin/users/' + encodeURIComponent(user.id) + '/tokens')).tokens || [];
  }

  async function toggleTokens(button, user) {
    const row = button.closest('tr');
    const next = row.nextElementSibling;
    if (next && next.classList.contains('tokens-row')) {
      next.remove();
      button.setAttribute('aria-expanded', 'false');
      return;
    }
    try {
      const tokens = await tokensOf(user);
      const table = el('table', { class: 'numbers' },
        el('thead', {}, el('tr', {}, ...['Name', 'Prefix', 'Created', 'Last used', 'Expires', 'Revoked']
          .map((h) => el('th', { scope: 'col' }, h)))),
        el('tbody', {}, ...tokens.map((t) => el('tr', {},
          el('td', {}, text(t.name)), el('td', {}, text(t.prefix)), el('td', {}, shortTime(t.created_at)),
          el('td', {}, shortTime(t.last_used_at)), el('td', {}, shortTime(t.expires_at)),
          el('td', {}, shortTime(t.revoked_at))))));
      row.after(el('tr', { class: 'tokens-row' }, el('td', { colspan: '8' }, tokens.length ? table : 'No tokens.')));
      button.setAttribute('aria-expanded', 'true');
    } catch (error) {
      if (error.status === 403) button.hidden = true;
      setStatus('users-status', error.message, true);
    }
  }

  // ---- Files ----

  function saveFile(blob, name) {
    const url = URL.createObjectURL(blob);
    const link = el('a', { href: url, download: name, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  function csvCell(value) {
    let cell = text(value);
    // As the server's export does: a cell a spreadsheet would run as a
    // formula gets a leading quote.
    if (/^[=+\-@\t\r]/.test(cell)) cell = "'" + cell;
    return /[",\r\n]/.test(cell) ? '"' + cell.replace(/"/g, '""') + '"' : cell;
  }

  function csv(columns, rows) {
    const lines = [columns.join(',')];
    for (const row of rows) lines.push(columns.map((c) => csvCell(row[c])).join(','));
    return lines.join('\r\n') + '\r\n';
  }

  function stamp() {
    return new Date().toISOString().replace(/[-:]/g, '').slice(0, 15) + 'Z';
  }

  async function exportRecords() {
    const params = new URLSearchParams(search.params || filterParams());
    params.set('format', $('export-format').value);
    if ($('export-gzip').checked) params.set('compress', 'true');
    const limit = $('export-limit').value.trim();
    if (limit) params.set('limit', limit);
    const button = $('export-button');
    button.disabled = true;
    setStatus('search-status', 'Exporting…');
    try {
      const response = await call('/admin/audit/export', params, { accept: '*/*' });
      const disposition = response.headers.get('Content-Disposition') || '';
      const match = /filename="?([^";]+)"?/.exec(disposition);
      const name = match ? match[1] : 'audit-export';
      const blob = await response.blob();
      saveFile(blob, name);
      setStatus('search-status', 'Exported ' + name + ' (' + blob.size + ' bytes).');
    } catch (error) {
      setStatus('search-status', 'Export failed: ' + error.message, true);
    } finally {
      button.disabled = false;
    }
  }

  const USER_COLUMNS = ['id', 'name', 'email', 'role', 'tier', 'is_active', 'created_at'];
  const TOKEN_COLUMNS = ['user_id', 'user_name', 'id', 'name', 'prefix', 'created_at',
    'last_used_at', 'expires_at', 'revoked_at'];

  async function exportUsers() {
    try {
      const list = (await callJson('/admin/users')).users || [];
      saveFile(new Blob([csv(USER_COLUMNS, list)], { type: 'text/csv' }), 'nox-users-' + stamp() + '.csv');
      setStatus('users-status', 'Exported ' + list.length + ' users.');
    } catch (error) {
      setStatus('users-status', 'Export failed: ' + error.message, true);
    }
  }

  async function exportTokens() {
    try {
      const list = (await callJson('/admin/users')).users || [];
      const rows = [];
      for (const user of list) {
        for (const t of await tokensOf(user)) rows.push(Object.assign({ user_name: user.name }, t));
      }
      saveFile(new Blob([csv(TOKEN_COLUMNS, rows)], { type: 'text/csv' }), 'nox-tokens-' + stamp() + '.csv');
      setStatus('users-status', 'Exported ' + rows.length + ' tokens (never their secrets).');
    } catch (error) {
      if (error.status === 403) $('tokens-export').hidden = true;
      setStatus('users-status', 'Export failed: ' + error.message, true);
    }
  }

  // ---- Wiring ----

  function fillDatalist(id, values) {
    const list = $(id);
    for (const value of values) list.append(el('option', { value }));
  }

  function start() {
    // On a phone the filters start folded away.
    if (window.matchMedia('(max-width: 700px)').matches) $('filters-panel').open = false;
    fillDatalist('action-type-options', ACTION_TYPES);
    fillDatalist('action-category-options', ACTION_CATEGORIES);

    $('signin-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      const candidate = $('token').value.trim();
      $('signin-error').textContent = '';
      if (!candidate) return;
      $('signin-submit').disabled = true;
      try {
        await signIn(candidate);
        $('token').value = '';
      } catch (error) {
        $('signin-error').textContent = error.status === 401 ? 'The server does not accept this token.' : error.message;
        $('token').focus();
      } finally {
        $('signin-submit').disabled = false;
      }
    });
    $('sign-out').addEventListener('click', () => signOut(''));
    $('filters').addEventListener('submit', (event) => {
      event.preventDefault();
      filtersChanged();
    });
    $('clear-filters').addEventListener('click', () => {
      setFilters({});
      filtersChanged();
    });
    $('load-more').addEventListener('click', () => loadPage(search.generation));
    $('export-form').addEventListener('submit', (event) => {
      event.preventDefault();
      exportRecords();
    });
    $('live-toggle').addEventListener('click', () => {
      live.paused = !live.paused;
      updateLiveButton();
      if (live.paused) {
        stopLive();
        liveStatus('paused', 'Paused' + (live.lastId !== null ? ' after record ' + live.lastId : '')
          + '; Resume continues from there.');
      } else {
        startLive();
      }
    });
    $('live-clear').addEventListener('click', () => {
      clear($('live-records').tBodies[0]);
    });
    $('activity-form').addEventListener('submit', (event) => {
      event.preventDefault();
      loadActivity();
    });
    $('integrity-refresh').addEventListener('click', loadIntegrity);
    $('users-export').addEventListener('click', exportUsers);
    $('tokens-export').addEventListener('click', exportTokens);
    $('detail-close').addEventListener('click', () => $('detail').close());
    $('detail-user').addEventListener('click', () => searchFor({ user_id: detailRecord.user_id }));
    $('detail-session').addEventListener('click', () => searchFor({ session_id: detailRecord.session_id }));
    $('detail-request').addEventListener('click', () => searchFor({ request_id: detailRecord.request_id }));
    $('search-title').setAttribute('tabindex', '-1');
    window.addEventListener('hashchange', route);

    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) {
      signIn(saved).catch((error) => {
        sessionStorage.removeItem(TOKEN_KEY);
        $('signin-error').textContent = error.message;
      });
    } else {
      $('token').focus();
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
}());

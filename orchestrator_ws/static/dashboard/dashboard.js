/*
 * The dashboard's one module: three live pages on top of the REST API and the websocket
 * protocol (docs/websocket-protocol.md). No framework and no build step: each page loads its
 * state, then applies the frames of its websockets to the DOM as they arrive.
 *
 * LiveSocket carries the protocol's client duties (last seq, ?since= on reconnect, gaps,
 * resync, heartbeat, backoff) and reports to the connection indicator, so a page never looks
 * live when it is not.
 */

const PING = "__ping__";
const PONG = "__pong__";
// Traffic at least this often keeps proxies from closing an idle socket as dead.
const PING_INTERVAL_MS = 30_000;
// A ping unanswered this long means the connection died without the browser noticing.
const PONG_TIMEOUT_MS = 10_000;
const RETRY_FIRST_DELAY_MS = 500;
const RETRY_MAX_DELAY_MS = 10_000;
// +-30% on each delay, so the clients of a restarted server do not all come back at once.
const RETRY_JITTER = 0.3;
// Out of sync this long, the page says that what it shows may be out of date.
const STALE_AFTER_MS = 5_000;
const PROCESS_LIST_LIMIT = 100;

const RESUMABLE_STATUSES = new Set([
  "suspended",
  "failed",
  "waiting",
  "api_unavailable",
  "inconsistent_data",
]);
const FINISHED_STATUSES = new Set(["completed", "aborted"]);
// A worker runs, or is about to run, the first pending step of a process in these statuses.
const EXECUTING_STATUSES = new Set(["created", "running", "resumed"]);
const DONE_STEP_STATUSES = new Set(["success", "complete", "skipped"]);

const CONNECTION_LABELS = {
  live: "Live",
  reconnecting: "Connecting…",
  stale: "Offline: data may be out of date",
};

// --- connection ---------------------------------------------------------------------------

/** The header's connection indicator: the worst state among the page's sockets. */
class ConnectionIndicator {
  constructor(element) {
    this.element = element;
    this.sockets = [];
  }

  add(socket) {
    this.sockets.push(socket);
  }

  /** Called whenever a socket goes in or out of sync, and again when one may have turned stale. */
  update() {
    const now = Date.now();
    const outOfSync = this.sockets.filter((socket) => socket.failed || socket.outOfSyncSince !== null);
    let state = "live";
    if (outOfSync.some((socket) => socket.failed || now - socket.outOfSyncSince >= STALE_AFTER_MS)) {
      state = "stale";
    } else if (outOfSync.length > 0) {
      state = "reconnecting";
    }
    this.element.dataset.state = state;
    this.element.textContent = CONNECTION_LABELS[state];
    document.body.dataset.connection = state; // the stylesheet dims a stale page
  }
}

/** A retry delay: doubling from RETRY_FIRST_DELAY_MS up to RETRY_MAX_DELAY_MS, with jitter. */
function retryDelay(attempt) {
  const delay = Math.min(RETRY_FIRST_DELAY_MS * 2 ** attempt, RETRY_MAX_DELAY_MS);
  return delay * (1 + RETRY_JITTER * (2 * Math.random() - 1));
}

/**
 * One websocket endpoint, followed for as long as the page is open.
 *
 * Frames reach `onFrame` in seq order, one at a time; when it returns a promise (the list
 * reloading over HTTP after a resync), later frames wait for it. A frame whose seq is not the
 * previous one + 1 means one was lost: the socket reconnects at once with ?since= so the server
 * replays what is missing or answers with a resync. Closed by the network or the server, it
 * reconnects with ?since= after a growing delay. A frame with "close" ends the stream (the
 * process is no longer active) and one with "error" means the server refused us: neither is
 * retried until `connect` is called again.
 */
class LiveSocket {
  constructor(path, { onFrame, onError = showPageNotice }) {
    this.path = path;
    this.onFrame = onFrame;
    this.onError = onError;
    this.ws = null;
    this.lastSeq = null; // the seq of the last frame applied: what ?since= asks to continue from
    this.failedAttempts = 0;
    this.ended = false;
    this.failed = false;
    this.outOfSyncSince = null;
    this.applying = Promise.resolve(); // frames are applied one after the other on this chain
    this.timers = {};
    indicator.add(this);
    this.markOutOfSync();
  }

  /** Opens the socket; `since`: the seq the page's state already reflects (null: none). */
  connect(since = this.lastSeq) {
    clearTimeout(this.timers.reconnect);
    this.lastSeq = since;
    this.ended = this.failed = false;
    const url = new URL(this.path, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (since !== null) url.searchParams.set("since", since);
    const ws = new WebSocket(url);
    this.ws = ws; // from now on, frames and events of any older socket are ignored
    ws.onopen = () => {
      this.failedAttempts = 0;
      this.markInSync();
      this.timers.ping = setInterval(() => this.ping(ws), PING_INTERVAL_MS);
    };
    ws.onmessage = (event) => this.receive(ws, event.data);
    ws.onclose = () => {
      if (ws === this.ws) this.closed();
    };
  }

  receive(ws, text) {
    if (ws !== this.ws) return;
    clearTimeout(this.timers.pong); // any traffic shows the connection is alive
    if (text === PONG) return;
    const frame = JSON.parse(text);
    // Noted on arrival, not when applied: the server closes the socket right after these.
    this.ended ||= Boolean(frame.close);
    this.failed ||= Boolean(frame.error);
    this.applying = this.applying.then(() => this.apply(ws, frame)).catch(reportError);
  }

  async apply(ws, frame) {
    // A socket replaced since: its successor asked for everything after the last seq applied.
    if (ws !== this.ws) return;
    if (frame.error) {
      indicator.update();
      this.onError(frame.error.detail);
      return;
    }
    const seq = frame.seq ?? null;
    if (!frame.resync && seq !== null && this.lastSeq !== null && seq !== this.lastSeq + 1) {
      this.reconnect(); // a message was lost on the way: the server replays it or resyncs
      return;
    }
    if (frame.resync) this.markOutOfSync(); // until the page has rebuilt its state
    await this.onFrame(frame);
    if (seq !== null) this.lastSeq = seq; // a resync's seq may be lower: the server lost its history
    if (frame.resync && ws === this.ws && ws.readyState === WebSocket.OPEN) this.markInSync();
  }

  closed() {
    this.stopHeartbeat();
    if (this.ended) this.markInSync(); // what the page shows is final
    if (this.ended || this.failed) return;
    this.markOutOfSync();
    this.timers.reconnect = setTimeout(() => this.connect(), retryDelay(this.failedAttempts++));
  }

  /** Drops the socket and connects again at once, asking for everything after the last seq applied. */
  reconnect() {
    const ws = this.ws;
    this.stopHeartbeat();
    this.markOutOfSync();
    this.connect();
    ws.close();
  }

  ping(ws) {
    ws.send(PING);
    this.timers.pong = setTimeout(() => this.reconnect(), PONG_TIMEOUT_MS);
  }

  stopHeartbeat() {
    clearInterval(this.timers.ping);
    clearTimeout(this.timers.pong);
  }

  markOutOfSync() {
    if (this.outOfSyncSince === null) {
      this.outOfSyncSince = Date.now();
      setTimeout(() => indicator.update(), STALE_AFTER_MS);
    }
    indicator.update();
  }

  markInSync() {
    this.outOfSyncSince = null;
    indicator.update();
  }
}

// --- HTTP ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body?.detail ?? `HTTP ${status}`);
    this.status = status;
    this.fieldErrors = body?.errors ?? [];
  }
}

/** A call to the REST API: the JSON body (null for 204), or an ApiError for 4xx and 5xx. */
async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/** Calls `load` until it succeeds: a failed load is usually a server restarting. */
async function untilLoaded(load) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await load();
    } catch (error) {
      console.warn("retrying after", error);
      await new Promise((resolve) => setTimeout(resolve, retryDelay(attempt)));
    }
  }
}

// --- DOM ----------------------------------------------------------------------------------

/**
 * Creates an element. Text is always added as text, never parsed as HTML: process data comes
 * from users. Attributes that are null, undefined or false are left out; `on…` ones are listeners.
 */
function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

const find = (testId) => document.querySelector(`[data-testid="${testId}"]`);

const detailUrl = (processId) => `/processes/${processId}/`;

const statusLabel = (status) => status.replaceAll("_", " ");

function statusBadge(status) {
  return element("span", { class: "badge", "data-status": status }, statusLabel(status));
}

function timeElement(iso) {
  if (!iso) return null;
  const text = new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
  return element("time", { datetime: iso }, text);
}

function showPageNotice(text) {
  const notice = find("page-notice");
  notice.textContent = text;
  notice.hidden = false;
}

// --- forms from JSON schemas ----------------------------------------------------------------

/** A property's schema as pydantic writes it: enums sit in $defs, optional fields in anyOf. */
function fieldSchema(schema, property) {
  if (property.$ref) {
    const definition = schema.$defs?.[property.$ref.split("/").pop()] ?? {};
    return { ...definition, ...property };
  }
  const notNull = property.anyOf?.find((option) => option.type !== "null");
  return notNull ? { ...property, ...fieldSchema(schema, notNull) } : property;
}

function schemaProperties(schema) {
  return Object.entries(schema?.properties ?? {}).map(([name, property]) => [
    name,
    fieldSchema(schema, property),
  ]);
}

function fieldInput(name, field, required) {
  if (field.enum) {
    const options = field.enum.map((value, index) =>
      element("option", { value: index, selected: value === field.default }, String(value)),
    );
    return element("select", { name, required }, ...options);
  }
  if (field.type === "integer" || field.type === "number") {
    const step = field.type === "integer" ? 1 : "any";
    return element("input", {
      type: "number",
      name,
      required,
      step,
      min: field.minimum,
      max: field.maximum,
      value: field.default,
    });
  }
  return element("input", {
    type: "text",
    name,
    required,
    minlength: field.minLength,
    maxlength: field.maxLength,
    value: field.default,
  });
}

function schemaField(name, field, required) {
  const title = field.title ?? name;
  const help = field.description ? element("small", { class: "field-help" }, field.description) : null;
  const error = element("small", { class: "field-error", "data-field-error": name });
  if (field.type === "boolean") {
    const checkbox = element("input", { type: "checkbox", name, checked: field.default === true });
    return element("label", { class: "field checkbox" }, checkbox, element("span", {}, title), help, error);
  }
  const label = element("span", { class: "field-label" }, title);
  return element("label", { class: "field" }, label, fieldInput(name, field, required), help, error);
}

/** The form's input as the API takes it: one object, typed per the schema. */
function schemaValues(form, schema) {
  const values = {};
  for (const [name, field] of schemaProperties(schema)) {
    const input = form.elements.namedItem(name);
    if (field.type === "boolean") values[name] = input.checked;
    else if (field.enum) values[name] = field.enum[input.value];
    // Left empty: the server fills in the default, or says the field is required.
    else if (input.value === "") continue;
    else if (field.type === "integer" || field.type === "number") values[name] = Number(input.value);
    else values[name] = input.value;
  }
  return values;
}

/** Puts each of the API's field errors next to its input; the rest goes on the form's error line. */
function showFormErrors(form, error) {
  for (const slot of form.querySelectorAll("[data-field-error]")) slot.textContent = "";
  const unplaced = [];
  for (const { field, message } of error?.fieldErrors ?? []) {
    const slot = form.querySelector(`[data-field-error="${CSS.escape(field.split(".").pop())}"]`);
    if (slot) slot.textContent = message;
    else unplaced.push(`${field}: ${message}`);
  }
  form.querySelector("[data-testid=form-error]").textContent = error
    ? [error.message, ...unplaced].join(" · ")
    : "";
}

/** A form for a JSON schema (null: no fields); submitting it calls `send` with the values. */
function schemaForm({ schema, submitLabel, testId, send }, ...otherActions) {
  const required = new Set(schema?.required ?? []);
  const fields = schemaProperties(schema).map(([name, field]) =>
    schemaField(name, field, required.has(name)),
  );
  const submit = element("button", { type: "submit", class: "button primary" }, submitLabel);
  const form = element(
    "form",
    { class: "schema-form", "data-testid": testId },
    ...fields,
    element("p", { class: "form-error", "data-testid": "form-error", role: "alert" }),
    element("div", { class: "form-actions" }, submit, ...otherActions),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    try {
      showFormErrors(form, null);
      await send(schemaValues(form, schema));
    } catch (error) {
      showFormErrors(form, error);
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

// --- engine status (every page's header, and the engine page) -------------------------------

function showEngineInHeader(status) {
  const chip = find("engine-status");
  chip.dataset.status = status.global_status;
  chip.textContent = `Engine ${status.global_status}`;
}

/** Wires the engine page's lock button; returns what shows each engine status on the page. */
function setUpEnginePage() {
  const button = find("engine-lock");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      // The new status arrives on the websocket, like everybody else's view of it.
      await api("PUT", "/api/settings/status", { global_lock: button.dataset.locked !== "true" });
    } catch (error) {
      showPageNotice(`Could not change the lock: ${error.message}`);
    } finally {
      button.disabled = false;
    }
  });
  return (status) => {
    const badge = find("engine-global-status");
    badge.dataset.status = status.global_status;
    badge.textContent = status.global_status;
    find("running-processes").textContent = status.running_processes;
    button.dataset.locked = status.global_lock;
    button.textContent = status.global_lock ? "Unlock engine" : "Lock engine";
    button.disabled = false;
  };
}

// --- process list ---------------------------------------------------------------------------

function fillProcessRow(row, process) {
  row.dataset.status = process.last_status;
  row.dataset.startedAt = process.started_at;
  row.replaceChildren(
    element("td", {}, element("a", { href: detailUrl(process.process_id) }, process.workflow_name)),
    element("td", {}, statusBadge(process.last_status)),
    element("td", {}, process.last_step),
    element("td", {}, process.assignee),
    element("td", {}, timeElement(process.started_at)),
    element("td", {}, timeElement(process.last_modified_at)),
  );
  return row;
}

const processRow = (process) =>
  fillProcessRow(element("tr", { "data-process-id": process.process_id }), process);

/** Applies one summary from the list websocket: update its row, insert it newest first, or remove it. */
function showProcess(rows, process) {
  const row = rows.querySelector(`tr[data-process-id="${CSS.escape(process.process_id)}"]`);
  if (process.deleted) {
    row?.remove();
  } else if (row) {
    fillProcessRow(row, process);
  } else {
    const started = Date.parse(process.started_at);
    const older = [...rows.rows].find((other) => Date.parse(other.dataset.startedAt) < started);
    rows.insertBefore(processRow(process), older ?? null);
    while (rows.rows.length > PROCESS_LIST_LIMIT) rows.lastElementChild.remove();
  }
}

function showStartForm(workflow) {
  const panel = find("start-panel");
  const send = async (values) => {
    const { id } = await api("POST", `/api/processes/${workflow.name}`, [values]);
    const link = element("a", { href: detailUrl(id) }, "open it");
    panel.replaceChildren(
      element("p", { class: "notice", "data-testid": "started" }, `Started ${workflow.name}: `, link),
    );
  };
  const cancel = element(
    "button",
    { type: "button", class: "button", onclick: () => panel.replaceChildren() },
    "Cancel",
  );
  const form = schemaForm(
    { schema: workflow.form, submitLabel: `Start ${workflow.name}`, testId: "start-form", send },
    cancel,
  );
  form.dataset.workflow = workflow.name;
  panel.replaceChildren(element("p", { class: "help" }, workflow.description), form);
}

async function showWorkflowButtons() {
  const buttons = find("workflows");
  const workflows = await untilLoaded(() => api("GET", "/api/workflows/"));
  buttons.replaceChildren(
    ...workflows.map((workflow) =>
      element(
        "button",
        {
          type: "button",
          class: "button",
          "data-workflow": workflow.name,
          title: workflow.description,
          onclick: () => showStartForm(workflow),
        },
        workflow.name,
      ),
    ),
  );
  buttons.removeAttribute("aria-busy");
}

async function processListPage() {
  const table = find("process-table");
  const rows = table.tBodies[0];
  let loadedSeq = null; // the list's seq when the rows were read: they already show frames up to it

  async function loadRows() {
    table.setAttribute("aria-busy", "true");
    const page = await untilLoaded(() => api("GET", `/api/processes/?limit=${PROCESS_LIST_LIMIT}`));
    rows.replaceChildren(...page.items.map(processRow));
    table.removeAttribute("aria-busy");
    loadedSeq = page.seq;
    return page.seq;
  }

  const socket = new LiveSocket("/api/processes/all/", {
    onFrame(frame) {
      if (frame.resync) return loadRows(); // messages were lost: the list is read again
      const alreadyLoaded = loadedSeq !== null && frame.seq !== null && frame.seq <= loadedSeq;
      if (!alreadyLoaded) showProcess(rows, frame.process);
    },
  });
  showWorkflowButtons();
  socket.connect(await loadRows());
}

// --- process detail -------------------------------------------------------------------------

/** Where each step stands: done (or past), current, or pending. */
function stepStates(process, logged, pending) {
  const last = logged.at(-1);
  const lastIsCurrent =
    last && !DONE_STEP_STATUSES.has(last.status) && !FINISHED_STATUSES.has(process.last_status);
  const firstPendingIsCurrent = !lastIsCurrent && EXECUTING_STATUSES.has(process.last_status);
  return [
    ...logged.map((step) => [step, step === last && lastIsCurrent ? "current" : "done"]),
    ...pending.map((step, index) => [step, index === 0 && firstPendingIsCurrent ? "current" : "pending"]),
  ];
}

function showTimeline(process, loggedSteps) {
  const pending = process.steps.filter((step) => step.status === "pending");
  const entries = stepStates(process, [...loggedSteps.values()], pending).map(([step, state]) =>
    element(
      "li",
      { "data-state": state, "data-step-status": step.status, "data-testid": "timeline-step" },
      element("span", { class: "step-name" }, step.name),
      element("span", { class: "step-status" }, step.status),
      timeElement(step.executed),
    ),
  );
  find("timeline").replaceChildren(...entries);
}

function showProcessFacts(process) {
  const badge = find("process-status");
  badge.dataset.status = process.last_status;
  badge.textContent = statusLabel(process.last_status);
  const facts = [
    ["Last step", process.last_step],
    ["Assignee", process.assignee],
    ["Created by", process.created_by],
    ["Started", timeElement(process.started_at)],
    ["Modified", timeElement(process.last_modified_at)],
    ["Failed because", process.failed_reason],
  ].filter(([, value]) => value);
  find("process-facts").replaceChildren(
    ...facts.flatMap(([term, value]) => [element("dt", {}, term), element("dd", {}, value)]),
  );
  find("current-state").textContent = JSON.stringify(process.current_state, null, 2);
}

function showStreamEnded(reason) {
  const notice = find("stream-ended");
  notice.hidden = reason === null;
  notice.textContent = reason === null ? "" : `Live updates ended: ${reason}`;
}

function processDetailPage() {
  const processId = document.querySelector("main").dataset.processId;
  const loggedSteps = new Map(); // step_id -> step, in the order they were logged
  const abort = find("abort");
  const resumePanel = find("resume-panel");
  let resumeFor = null; // which suspension or failure the resume panel was built for

  const socket = new LiveSocket(`/api/processes/${processId}`, { onFrame: showFrame });

  function showFrame(frame) {
    const process = frame.process;
    if (process.deleted) {
      showStreamEnded("process deleted");
      abort.hidden = true;
      showResumePanel(null);
      return;
    }
    // A frame's detail may already hold steps logged after its own `step`: merge by step_id.
    for (const step of [...process.steps, frame.step]) {
      if (step?.step_id) loggedSteps.set(step.step_id, step);
    }
    showProcessFacts(process);
    showTimeline(process, loggedSteps);
    abort.hidden = FINISHED_STATUSES.has(process.last_status);
    showResumePanel(RESUMABLE_STATUSES.has(process.last_status) ? process : null);
    showStreamEnded(frame.close ? `process ${statusLabel(process.last_status)}` : null);
  }

  async function showResumePanel(process) {
    const key = process && `${process.last_status}:${loggedSteps.size}`;
    if (key === resumeFor) return;
    resumeFor = key;
    if (process === null) {
      resumePanel.replaceChildren();
      return;
    }
    let schema = null; // only a suspended input step asks for input
    if (process.last_status === "suspended") {
      try {
        ({ form: schema } = await api("GET", `/api/processes/${processId}/resume-form`));
      } catch (error) {
        showPageNotice(`Could not load the resume form: ${error.message}`);
      }
    }
    if (key !== resumeFor) return; // the process moved on while the form loaded
    const send = async (values) => {
      await api("PUT", `/api/processes/${processId}/resume`, [values]);
      if (socket.ended) {
        // The stream closed when the process stopped; it is active again: follow it again.
        showStreamEnded(null);
        socket.connect();
      }
    };
    resumePanel.replaceChildren(
      element("h2", {}, "Resume"),
      schemaForm({ schema, submitLabel: "Resume", testId: "resume-form", send }),
    );
  }

  abort.addEventListener("click", () =>
    api("PUT", `/api/processes/${processId}/abort`).catch((error) =>
      showPageNotice(`Abort failed: ${error.message}`),
    ),
  );
  find("delete").addEventListener("click", async () => {
    if (!confirm("Delete this process and all its steps?")) return;
    try {
      await api("DELETE", `/api/processes/${processId}`);
      location.assign("/");
    } catch (error) {
      showPageNotice(`Delete failed: ${error.message}`);
    }
  });
  socket.connect();
}

// --- start ----------------------------------------------------------------------------------

const indicator = new ConnectionIndicator(find("connection"));

function start() {
  const page = document.body.dataset.page;
  const engineViews = [showEngineInHeader];
  if (page === "engine") engineViews.push(setUpEnginePage());
  new LiveSocket("/api/settings/ws-status/", {
    onFrame: (frame) => engineViews.forEach((show) => show(frame["engine-status"])),
  }).connect();
  if (page === "process-list") processListPage();
  if (page === "process-detail") processDetailPage();
}

start();

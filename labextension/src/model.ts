/**
 * What the panel shows, kept live from the events WebSocket: the control plane's endpoints,
 * their workers and the budget. Events are applied as they come; an event that does not carry
 * a whole view (a job finished, a worker billed) asks for that one endpoint again, coalesced, so
 * nothing is fetched while nothing changes. Countdowns and running costs are projected locally
 * from the time each view arrived.
 */
import { ISignal, Signal } from '@lumino/signaling';

import { api, APIError, EventSocket, IBudget, IEndpoint, IWorker } from './api';

/** Where the panel stands with the control plane. */
export type Connection =
  | 'connecting' // no answer yet
  | 'no-extension' // the server extension is not enabled
  | 'down' // no control plane running
  | 'starting' // Start pressed
  | 'up';

interface IEndpointEntry {
  view: IEndpoint;
  /** performance.now() when each worker's view arrived. */
  workerAt: Map<string, number>;
  /** This session's cost of workers that have already stopped (the ledger's part). */
  closedCost: number;
}

// Views asked again after a job or billing event wait this long, so a burst costs one request.
const REFRESH_DELAY_MS = 250;

const now = (): number => performance.now();

/** A worker slot that has a process, hence a bill. */
export function isBilled(w: IWorker): boolean {
  return w.pid !== null && w.pid !== undefined ? true : (w.billed_seconds ?? 0) > 0;
}

export class FlashModel {
  connection: Connection = 'connecting';
  message = '';
  version = '';
  budget: IBudget | null = null;
  /** The events socket delivered its snapshot: what shows is live. */
  synced = false;
  /** A message about the last failed action, per endpoint ('' for the panel as a whole). */
  readonly notices = new Map<string, string>();

  private readonly entries = new Map<string, IEndpointEntry>();
  /** Session cost of endpoints no longer listed (deleted): the budget's spend minus theirs. */
  private deletedCost = 0;
  /** Endpoints whose view is asked for; those that changed again while it was on its way. */
  private readonly pending = new Set<string>();
  private readonly dirty = new Set<string>();
  private budgetPending = false;
  private readonly socket: EventSocket;
  private readonly _changed = new Signal<this, void>(this);

  constructor() {
    this.socket = new EventSocket(
      ev => this.apply(ev),
      open => this.socketOpen(open)
    );
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Find out where things stand, then listen. */
  async start(): Promise<void> {
    await this.checkStatus();
    this.socket.connect();
  }

  dispose(): void {
    this.socket.dispose();
  }

  endpoints(): IEndpoint[] {
    return [...this.entries.values()].map(e => e.view).sort((a, b) => a.name.localeCompare(b.name));
  }

  endpoint(name: string): IEndpoint | undefined {
    return this.entries.get(name)?.view;
  }

  // ------------------------------------------------------------ local projections

  /** Seconds until an idle warm worker scales down, counted down since its view arrived. */
  scaleDownIn(w: IWorker): number | null {
    if (w.scale_down_in_s === null || w.scale_down_in_s === undefined) {
      return null;
    }
    const at = this.entries.get(w.endpoint)?.workerAt.get(w.id) ?? now();
    return Math.max(0, w.scale_down_in_s - (now() - at) / 1000);
  }

  /** A worker's cost so far, rising while it has a process. */
  workerCost(w: IWorker): number {
    if (!isBilled(w)) {
      return w.cost ?? 0;
    }
    const at = this.entries.get(w.endpoint)?.workerAt.get(w.id) ?? now();
    return (w.cost ?? 0) + (w.price_per_second * (now() - at)) / 1000;
  }

  /** An endpoint's cost this session, running workers counted up to now. */
  endpointCost(name: string): number {
    const e = this.entries.get(name);
    if (!e) {
      return 0;
    }
    return e.closedCost + e.view.workers.reduce((s, w) => s + this.workerCost(w), 0);
  }

  /** The session's spend, running workers counted up to now (as the budget counts it). */
  sessionCost(): number {
    return this.deletedCost + this.listedCost();
  }

  private listedCost(): number {
    return [...this.entries.keys()].reduce((s, n) => s + this.endpointCost(n), 0);
  }

  /** Whether anything on screen moves by itself (then the panel ticks once a second). */
  ticking(): boolean {
    for (const e of this.entries.values()) {
      for (const w of e.view.workers) {
        if (isBilled(w) || (w.scale_down_in_s ?? null) !== null) {
          return true;
        }
      }
    }
    return false;
  }

  // ------------------------------------------------------------ actions

  /** Start the machine-local control plane (the panel's Start button). */
  async startControlPlane(): Promise<void> {
    this.connection = 'starting';
    this.notices.delete('');
    this.emit();
    try {
      const st = await api.start();
      this.setStatus(st.running, st.message);
      if (st.running) {
        await this.loadAll();
      }
    } catch (err) {
      this.connection = 'down';
      this.notices.set('', describe(err, 'start the control plane'));
    }
    this.socket.reconnectSoon();
    this.emit();
  }

  /** Run one endpoint action; a failure becomes a notice on its card, never a bare error. */
  async act(name: string, what: string, fn: () => Promise<unknown>): Promise<void> {
    this.notices.delete(name);
    this.emit();
    try {
      await fn();
    } catch (err) {
      this.notices.set(name, describe(err, what));
      this.emit();
      return;
    }
    if (what !== 'delete') {
      this.refresh(name);
    }
  }

  async setBudget(limit: number | null): Promise<void> {
    this.notices.delete('');
    try {
      this.setBudgetView(await api.setBudget(limit));
    } catch (err) {
      this.notices.set('', describe(err, 'set the budget'));
    }
    this.emit();
  }

  notify(key: string, text: string): void {
    this.notices.set(key, text);
    this.emit();
  }

  dismiss(key: string): void {
    this.notices.delete(key);
    this.emit();
  }

  // ------------------------------------------------------------ events

  /** Apply one message from the events WebSocket. */
  apply(ev: any): void {
    switch (ev?.type) {
      case 'control_plane':
        this.setStatus(Boolean(ev.running), ev.message);
        if (ev.running) {
          this.refreshBudget();
        }
        break;
      case 'snapshot':
        this.connection = 'up';
        this.synced = true;
        this.entries.clear();
        for (const view of ev.endpoints ?? []) {
          this.setView(view, now());
        }
        if (ev.budget) {
          this.setBudgetView(ev.budget);
        } else {
          this.refreshBudget();
        }
        break;
      case 'endpoint': {
        const view = ev.view ?? ev.endpoint;
        if (ev.action === 'deleted') {
          this.deletedCost += this.endpointCost(ev.name);
          this.entries.delete(ev.name);
          this.refreshBudget();
          this.notices.delete(ev.name);
        } else if (view && typeof view === 'object' && Array.isArray(view.workers)) {
          this.setView(view, now());
        } else {
          if (!this.entries.has(ev.name)) {
            this.entries.set(ev.name, {
              view: stubView(ev.name),
              workerAt: new Map(),
              closedCost: 0
            });
          }
          this.refresh(ev.name, 0);
        }
        break;
      }
      case 'worker':
        this.applyWorker(ev as IWorker);
        break;
      case 'job':
        this.refresh(ev.endpoint);
        break;
      case 'billing':
        this.refresh(ev.endpoint);
        this.refreshBudget();
        break;
      case 'budget':
        this.setBudgetView(ev.view ?? ev.budget ?? ev);
        break;
      case 'state_lost':
        if (ev.endpoint) {
          this.refresh(ev.endpoint);
        }
        break;
      default:
        return; // output, display, chunk: not the panel's
    }
    this.emit();
  }

  private applyWorker(w: IWorker): void {
    let e = this.entries.get(w.endpoint);
    if (!e) {
      // A worker of an endpoint not seen yet (just made): show it at once, settings follow.
      e = { view: stubView(w.endpoint), workerAt: new Map(), closedCost: 0 };
      this.entries.set(w.endpoint, e);
      this.refresh(w.endpoint);
    }
    const workers = e.view.workers.slice();
    const i = workers.findIndex(x => x.id === w.id);
    if (i >= 0) {
      if (isBilled(workers[i]) && !isBilled(w)) {
        // It stopped: what it cost moves to the ledger (the next view says exactly).
        e.closedCost += this.workerCost(workers[i]);
      }
      workers[i] = w;
    } else {
      workers.push(w);
    }
    e.view = { ...e.view, workers };
    e.workerAt.set(w.id, now());
  }

  private setView(view: IEndpoint, sentAt: number): void {
    const old = this.entries.get(view.name);
    const workerAt = new Map<string, number>();
    const t = now();
    const workers = view.workers.map(w => {
      // A worker event that came after this view was asked for is newer: keep it.
      const seen = old?.workerAt.get(w.id);
      const kept = old?.view.workers.find(x => x.id === w.id);
      if (seen !== undefined && seen > sentAt && kept) {
        workerAt.set(w.id, seen);
        return kept;
      }
      workerAt.set(w.id, t);
      return w;
    });
    const live = view.workers.reduce((s, w) => s + (w.cost ?? 0), 0);
    const closedCost = Math.max(0, (view.session_cost ?? view.cost ?? 0) - live);
    this.entries.set(view.name, { view: { ...view, workers }, workerAt, closedCost });
  }

  private setBudgetView(b: any): void {
    if (b && typeof b === 'object' && 'spent' in b) {
      this.budget = b as IBudget;
      this.deletedCost = Math.max(0, b.spent - this.listedCost());
    }
  }

  private setStatus(running: boolean, message?: string): void {
    this.message = message ?? '';
    if (running) {
      this.connection = 'up';
    } else if (this.connection !== 'starting') {
      this.connection = 'down';
      this.synced = false;
      this.entries.clear();
      this.budget = null;
      this.deletedCost = 0;
    }
  }

  private socketOpen(open: boolean): void {
    if (!open) {
      this.synced = false;
      this.emit();
    }
    if (!open && this.connection === 'up') {
      // The Jupyter server went away (or restarts): say so until the socket is back.
      void this.checkStatus();
    }
  }

  private async checkStatus(): Promise<void> {
    try {
      const st = await api.status();
      this.version = st.version;
      this.setStatus(st.running, st.message);
    } catch (err) {
      if (err instanceof APIError && err.status === 404) {
        this.connection = 'no-extension';
      } else {
        this.connection = 'down';
      }
      this.message = describe(err, 'reach the server extension');
    }
    this.emit();
  }

  private async loadAll(): Promise<void> {
    const t = now();
    try {
      const views = await api.endpoints();
      for (const v of views) {
        this.setView(v, t);
      }
    } catch {
      // the socket's snapshot follows
    }
    this.refreshBudget();
  }

  /** Ask for one endpoint's view again: coalesced, one request at a time per endpoint, and
   * asked once more if it changed while the answer was on its way. */
  refresh(name: string | undefined, delay = REFRESH_DELAY_MS): void {
    if (!name) {
      return;
    }
    if (this.pending.has(name)) {
      this.dirty.add(name);
      return;
    }
    this.pending.add(name);
    window.setTimeout(async () => {
      const sentAt = now();
      this.dirty.delete(name);
      try {
        this.setView(await api.endpoint(name), sentAt);
      } catch (err) {
        if (err instanceof APIError && err.status === 404) {
          this.entries.delete(name);
        }
      } finally {
        this.pending.delete(name);
      }
      if (this.dirty.delete(name) && this.entries.has(name)) {
        this.refresh(name);
      }
      this.emit();
    }, delay);
  }

  private refreshBudget(): void {
    if (this.budgetPending) {
      return;
    }
    this.budgetPending = true;
    window.setTimeout(async () => {
      try {
        this.setBudgetView(await api.budget());
      } catch {
        // an older control plane without a budget: the panel shows the session cost only
      } finally {
        this.budgetPending = false;
      }
      this.emit();
    }, REFRESH_DELAY_MS);
  }

  private emit(): void {
    this._changed.emit();
  }
}

/** An endpoint known only by name until its view arrives. */
function stubView(name: string): IEndpoint {
  return {
    name,
    config: {},
    hardware: '',
    price_per_second: 0,
    workers: [],
    health: { workers: {}, jobs: {} },
    cost: 0,
    session_cost: 0,
    emulated: false,
    stub: true
  };
}

/** An error as one sentence that says what failed. */
export function describe(err: unknown, what: string): string {
  const msg = err instanceof Error ? err.message : String(err);
  return `Could not ${what}: ${msg}`;
}

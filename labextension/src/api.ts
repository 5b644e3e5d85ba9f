/**
 * The only door to the control plane: the Jupyter server extension's routes under
 * /flash-jupyter/api, called with Jupyter's own authentication (the control plane's token
 * never reaches the page), and its events WebSocket.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export const API_BASE = 'flash-jupyter/api';

/** A failed call, with the message the server gave (never a bare status). */
export class APIError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
  }
}

/** Call a route of the server extension; parsed JSON back, or an APIError with a clear message. */
export async function requestAPI<T = any>(
  path: string,
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, API_BASE, path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (err) {
    throw new APIError(
      `Jupyter's server could not be reached (${String(err)}); check that JupyterLab is still running.`,
      0
    );
  }
  const text = await response.text();
  let data: any = undefined;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!response.ok) {
    if (response.status === 404 && path === 'status') {
      throw new APIError(
        'The flash-jupyter server extension is not enabled in this Jupyter server. Run ' +
          '"jupyter server extension enable flash_jupyter" and restart JupyterLab.',
        404
      );
    }
    const message =
      (data && typeof data === 'object' && (data.error || data.message || data.reason)) ||
      (typeof data === 'string' && data.length < 300 ? data : '') ||
      `${response.status} ${response.statusText}`;
    throw new APIError(String(message), response.status);
  }
  return data as T;
}

/** JSON body helper. */
export function jsonBody(method: string, body: unknown): RequestInit {
  return { method, body: JSON.stringify(body), headers: { 'Content-Type': 'application/json' } };
}

// ---------------------------------------------------------------- shapes (the contract's views)

export interface IStatus {
  running: boolean;
  version: string;
  url_host: string | null;
  message: string;
}

export interface IRemoteState {
  notebook: string;
  names: string[];
  bytes: number;
}

export interface IWorker {
  id: string;
  endpoint: string;
  state: string;
  busy: boolean;
  jobs: string[];
  pid: number | null;
  hardware: string;
  hardware_label?: string;
  emulated: boolean;
  cold_start_ms: number | null;
  billed_seconds: number;
  cost: number;
  price_per_second: number;
  reason: string | null;
  phase?: 'environment' | 'process' | 'code' | null;
  scale_down_in_s?: number | null;
  idle_timeout?: number;
  remote_state?: Record<string, IRemoteState>;
}

export interface IStarts {
  cold: number;
  warm: number;
  last_cold_ms: number | null;
  mean_cold_ms: number | null;
}

export interface IEndpoint {
  name: string;
  config: Record<string, any>;
  hardware: string;
  price_per_second: number;
  workers: IWorker[];
  health: { workers: Record<string, number>; jobs: Record<string, number> };
  cost: number;
  session_cost: number;
  emulated: boolean;
  starts?: IStarts;
  queue?: number;
  /** Known by name only, its view on the way (the panel's own mark). */
  stub?: boolean;
}

export interface IBudgetLine {
  limit: number | null;
  spent: number;
  state: 'ok' | 'near' | 'reached';
}

export interface IBudget extends IBudgetLine {
  currency: string;
  near_fraction: number;
  endpoints: Record<string, IBudgetLine>;
}

export interface IBilling {
  currency: string;
  total: number;
  session: number;
  estimate: boolean;
  endpoints: Record<string, Record<string, any>>;
}

// ---------------------------------------------------------------- routes

const ep = (name: string, rest = ''): string => `endpoints/${encodeURIComponent(name)}${rest}`;

export const api = {
  status: () => requestAPI<IStatus>('status'),
  start: () => requestAPI<IStatus>('start', { method: 'POST' }),
  endpoints: () => requestAPI<IEndpoint[]>('endpoints'),
  endpoint: (name: string) => requestAPI<IEndpoint>(ep(name)),
  warm: (name: string, workers = 1) => requestAPI(ep(name, '/warm'), jsonBody('POST', { workers })),
  scale: (name: string, min: number, max: number) =>
    requestAPI(ep(name, '/scale'), jsonBody('POST', { min, max })),
  stop: (name: string) => requestAPI(ep(name, '/stop'), { method: 'POST' }),
  purge: (name: string) => requestAPI(ep(name, '/purge'), { method: 'POST' }),
  remove: (name: string) => requestAPI(ep(name), { method: 'DELETE' }),
  budget: () => requestAPI<IBudget>('budget'),
  setBudget: (limit: number | null, endpoint?: string) =>
    requestAPI<IBudget>('budget', jsonBody('PUT', endpoint ? { endpoint, limit } : { limit })),
  billing: () => requestAPI<IBilling>('billing'),
  prewarm: (line: string, kernelId?: string) =>
    requestAPI<{ endpoint: string; action: string; warmed: boolean }>(
      'prewarm',
      jsonBody('POST', kernelId ? { line, kernel_id: kernelId } : { line })
    )
};

// ---------------------------------------------------------------- the events WebSocket

/**
 * The server extension's event relay, reconnecting with backoff. One per page: every panel
 * listens to the same socket.
 */
export class EventSocket {
  private ws: WebSocket | null = null;
  private retry = 0;
  private timer: number | undefined;
  private disposed = false;

  constructor(
    private readonly onMessage: (ev: any) => void,
    private readonly onOpenChange: (open: boolean) => void,
    private readonly settings: ServerConnection.ISettings = ServerConnection.makeSettings()
  ) {}

  /** The socket's URL, with the token as a query parameter as @jupyterlab/services does. */
  url(): string {
    let url = URLExt.join(this.settings.wsUrl, API_BASE, 'events');
    const token = this.settings.token;
    if (this.settings.appendToken && token) {
      url += `?token=${encodeURIComponent(token)}`;
    }
    return url;
  }

  connect(): void {
    if (this.disposed) {
      return;
    }
    window.clearTimeout(this.timer);
    const ws = new this.settings.WebSocket(this.url());
    this.ws = ws;
    ws.onopen = () => {
      this.retry = 0;
      this.onOpenChange(true);
    };
    ws.onmessage = (msg: MessageEvent) => {
      let ev: any;
      try {
        ev = JSON.parse(String(msg.data));
      } catch {
        return;
      }
      this.onMessage(ev);
    };
    ws.onclose = () => {
      if (this.ws !== ws) {
        return;
      }
      this.ws = null;
      this.onOpenChange(false);
      if (!this.disposed) {
        // 0.5 s, 1 s, 2 s ... up to 10 s: a restarting Jupyter server is found again.
        const delay = Math.min(10000, 500 * 2 ** this.retry++);
        this.timer = window.setTimeout(() => this.connect(), delay);
      }
    };
  }

  /** Reconnect now (e.g. after Start), skipping the backoff. */
  reconnectSoon(): void {
    if (!this.ws && !this.disposed) {
      this.retry = 0;
      this.connect();
    }
  }

  dispose(): void {
    this.disposed = true;
    window.clearTimeout(this.timer);
    const ws = this.ws;
    this.ws = null;
    ws?.close();
  }
}

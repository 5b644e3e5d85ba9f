/**
 * Endpoint cards: settings, queue, cold/warm starts, one row per worker slot (state, cold-start
 * phase, countdown to scale-down, bill), what notebooks keep there, cost, and the actions.
 */
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';
import * as React from 'react';

import { api, IEndpoint, IWorker } from './api';
import { bytes, money, ms, PHASES, secs } from './format';
import { FlashModel, isBilled } from './model';

/** The body of the Scale dialog: two numbers. */
class ScaleBody extends Widget implements Dialog.IBodyWidget<{ min: number; max: number }> {
  private readonly min: HTMLInputElement;
  private readonly max: HTMLInputElement;

  constructor(min: number, max: number) {
    super();
    this.addClass('fj-scale-body');
    const field = (label: string, value: number): HTMLInputElement => {
      const row = document.createElement('label');
      row.textContent = label;
      const input = document.createElement('input');
      input.type = 'number';
      input.min = '0';
      input.step = '1';
      input.value = String(value);
      input.className = 'jp-mod-styled';
      row.appendChild(input);
      this.node.appendChild(row);
      return input;
    };
    this.min = field('Minimum workers (kept warm)', min);
    this.max = field('Maximum workers', max);
  }

  getValue(): { min: number; max: number } {
    return { min: Number(this.min.value), max: Number(this.max.value) };
  }
}

async function askScale(model: FlashModel, ep: IEndpoint): Promise<void> {
  const result = await showDialog({
    title: `Scale ${ep.name}`,
    body: new ScaleBody(ep.config.workers_min ?? 0, ep.config.workers_max ?? 1),
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Scale' })]
  });
  if (!result.button.accept || !result.value) {
    return;
  }
  const { min, max } = result.value;
  if (!Number.isInteger(min) || !Number.isInteger(max) || min < 0 || max < 1 || min > max) {
    model.notify(
      ep.name,
      `Workers ${min}..${max} is not a range: use whole numbers, 0 <= min <= max, max >= 1.`
    );
    return;
  }
  await model.act(ep.name, 'scale', () => api.scale(ep.name, min, max));
}

async function askDelete(model: FlashModel, ep: IEndpoint): Promise<void> {
  const result = await showDialog({
    title: `Delete ${ep.name}?`,
    body:
      'Its workers stop, queued and running jobs are cancelled, and what notebooks keep on its ' +
      'workers is lost. The next call or %%flash cell naming it deploys it again.',
    buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
  });
  if (result.button.accept) {
    await model.act(ep.name, 'delete', () => api.remove(ep.name));
  }
}

function WorkerRow(props: { model: FlashModel; w: IWorker }): JSX.Element {
  const { model, w } = props;
  const billed = isBilled(w);
  const down = model.scaleDownIn(w);
  let detail = '';
  if (w.state === 'Initializing') {
    detail = (w.phase && PHASES[w.phase]) || 'starting';
  } else if (w.state === 'Running') {
    detail = w.busy ? 'busy' : 'warm';
  } else if (w.reason && w.state !== 'Idle') {
    detail = w.reason;
  }
  return (
    <div
      className={`fj-worker fj-state-${w.state.toLowerCase()}${billed ? ' fj-billed' : ''}${
        w.busy ? ' fj-busy' : ''
      }`}
      data-worker={w.id}
      data-state={w.state}
      data-busy={w.busy ? 'true' : 'false'}
      data-phase={w.phase ?? ''}
      title={[
        w.id,
        w.hardware_label ?? w.hardware,
        w.cold_start_ms !== null ? `cold start ${ms(w.cold_start_ms)}` : '',
        w.reason ?? ''
      ]
        .filter(Boolean)
        .join(' · ')}
    >
      <span className="fj-dot" />
      <span className="fj-worker-id" title={w.id}>
        {shortId(w)}
      </span>
      <span className="fj-worker-state">{w.state}</span>
      <span className="fj-worker-detail">{detail}</span>
      {down !== null && (
        <span
          className="fj-countdown"
          data-scale-down-in={Math.ceil(down)}
          title={`scales down in ${secs(down)} unless a job comes`}
        >
          ↓ {secs(down)}
        </span>
      )}
      <span
        className="fj-worker-cost"
        title={billed ? 'billed while it has a process' : 'not billed'}
      >
        {billed ? money(model.workerCost(w)) : ''}
      </span>
    </div>
  );
}

/** "#1" for "prep-1": the endpoint's name is on the card already. */
function shortId(w: IWorker): string {
  const prefix = `${w.endpoint}-`;
  return w.id.startsWith(prefix) ? `#${w.id.slice(prefix.length)}` : w.id;
}

function RemoteState(props: { ep: IEndpoint }): JSX.Element | null {
  const lines: JSX.Element[] = [];
  for (const w of props.ep.workers) {
    for (const [session, st] of Object.entries(w.remote_state ?? {})) {
      lines.push(
        <div key={`${w.id}:${session}`} className="fj-remote" data-notebook={st.notebook}>
          <span className="fj-notebook">{st.notebook || session}</span> keeps {st.names.join(', ')}{' '}
          on {w.id} ({bytes(st.bytes)})
        </div>
      );
    }
  }
  return lines.length ? <div className="fj-remotes">{lines}</div> : null;
}

function hardwareLabel(ep: IEndpoint): string {
  const label = ep.workers.find(w => w.hardware_label)?.hardware_label;
  if (label) {
    return label;
  }
  return ep.emulated ? `${ep.hardware} (emulated on CPU)` : ep.hardware;
}

export function EndpointCard(props: { model: FlashModel; ep: IEndpoint }): JSX.Element {
  const { model, ep } = props;
  const c = ep.config;
  const queue = ep.queue ?? ep.health?.jobs?.inQueue ?? 0;
  const starts = ep.starts;
  const notice = model.notices.get(ep.name);
  const budgetLine = model.budget?.endpoints?.[ep.name];
  const act = (what: string, fn: () => Promise<unknown>) => () => void model.act(ep.name, what, fn);
  return (
    <div className="fj-endpoint" data-endpoint={ep.name}>
      <div className="fj-ep-head">
        <span className="fj-ep-name" title={ep.name}>
          {ep.name}
        </span>
        <span className="fj-ep-cost fj-money" title="this session's cost of this endpoint">
          {money(model.endpointCost(ep.name))}
        </span>
      </div>
      {ep.stub ? (
        <div className="fj-ep-line">loading…</div>
      ) : (
        <div className="fj-ep-line">
          <span className="fj-ep-hw">{hardwareLabel(ep)}</span> · workers {c.workers_min}..
          {c.workers_max} · idle {c.idle_timeout}s ·{' '}
          <span className={queue ? 'fj-queue fj-queue-busy' : 'fj-queue'} data-queue={queue}>
            queue {queue}
          </span>
          {budgetLine && budgetLine.limit !== null && (
            <span className={`fj-ep-budget fj-budget-${budgetLine.state}`}>
              {' '}
              · limit {money(budgetLine.limit)}
            </span>
          )}
        </div>
      )}
      {starts && (
        <div className="fj-ep-line fj-starts" data-cold={starts.cold} data-warm={starts.warm}>
          starts: {starts.cold} cold
          {starts.cold > 0 && ` (last ${ms(starts.last_cold_ms)}, mean ${ms(starts.mean_cold_ms)})`}
          , {starts.warm} warm
        </div>
      )}
      <div className="fj-workers">
        {ep.workers.map(w => (
          <WorkerRow key={w.id} model={model} w={w} />
        ))}
      </div>
      <RemoteState ep={ep} />
      <div className="fj-actions">
        <button
          title="Start a worker now and keep it warm"
          onClick={act('warm', () => api.warm(ep.name, 1))}
        >
          Warm
        </button>
        <button
          title="Change the minimum and maximum workers"
          onClick={() => void askScale(model, ep)}
        >
          Scale
        </button>
        <button title="Scale to zero now" onClick={act('stop', () => api.stop(ep.name))}>
          Stop
        </button>
        <button
          title="Cancel the jobs waiting in the queue"
          disabled={!queue}
          onClick={act('purge the queue', () => api.purge(ep.name))}
        >
          Purge
        </button>
        <button
          className="fj-danger"
          title="Delete this endpoint"
          onClick={() => void askDelete(model, ep)}
        >
          Delete
        </button>
      </div>
      {notice && (
        <div className="fj-notice" title="click to dismiss" onClick={() => model.dismiss(ep.name)}>
          {notice}
        </div>
      )}
    </div>
  );
}

export function EndpointList(props: { model: FlashModel }): JSX.Element {
  const eps = props.model.endpoints();
  if (!eps.length) {
    return (
      <div className="fj-empty">
        No endpoints yet. Run a <code>%%flash</code> cell or call an <code>@Endpoint</code>{' '}
        function; endpoints made by any notebook, script or curl on this machine show here.
      </div>
    );
  }
  return (
    <div className="fj-endpoints">
      {eps.map(ep => (
        <EndpointCard key={ep.name} model={props.model} ep={ep} />
      ))}
    </div>
  );
}

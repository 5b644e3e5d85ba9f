/** Spend and budget: the session's cost, the limit, and how near it is. */
import { InputDialog } from '@jupyterlab/apputils';
import * as React from 'react';

import { money } from './format';
import { FlashModel } from './model';

const STATE_TEXT: Record<string, string> = {
  ok: '',
  near: 'near the limit',
  reached: 'reached: new jobs are refused'
};

/** "2.50", "$2.50", "off" or "" (no limit) -> the limit; NaN for anything else. */
export function parseLimit(text: string): number | null {
  const t = text.trim().replace(/^\$/, '').toLowerCase();
  if (t === '' || t === 'off' || t === 'none') {
    return null;
  }
  const x = Number(t);
  return isFinite(x) && x >= 0 ? x : NaN;
}

async function askLimit(model: FlashModel): Promise<void> {
  const current = model.budget?.limit;
  const result = await InputDialog.getText({
    title: 'Session spending limit (USD)',
    label: 'New jobs are refused once the session has spent this much. Empty or "off": no limit.',
    text: current === null || current === undefined ? '' : String(current),
    placeholder: 'e.g. 2.50',
    okLabel: 'Set'
  });
  if (!result.button.accept) {
    return;
  }
  const limit = parseLimit(result.value ?? '');
  if (Number.isNaN(limit)) {
    model.notify('', `"${result.value}" is not an amount: type dollars like 2.50, or "off".`);
    return;
  }
  await model.setBudget(limit);
}

export function BudgetView(props: { model: FlashModel }): JSX.Element {
  const { model } = props;
  const b = model.budget;
  const spent = model.sessionCost();
  const state = b?.state ?? 'ok';
  const limit = b?.limit ?? null;
  const frac = limit ? Math.min(1, spent / limit) : 0;
  const notice = model.notices.get('');
  return (
    <div className={`fj-budget fj-budget-${state}`} data-budget-state={state}>
      <div className="fj-budget-line">
        <span className="fj-label">Session</span>
        <span className="fj-money" data-session-cost={spent.toFixed(8)}>
          {money(spent)}
        </span>
        {limit !== null ? (
          <span className="fj-budget-limit">of {money(limit)}</span>
        ) : (
          <span className="fj-hint">no budget</span>
        )}
        <button
          className="fj-link"
          title="Set a spending limit for this control plane's session"
          onClick={() => void askLimit(model)}
        >
          {limit !== null ? 'Change' : 'Set budget'}
        </button>
      </div>
      {limit !== null && (
        <div className="fj-bar" title={`${Math.round(frac * 100)}% of the budget`}>
          <div className="fj-bar-fill" style={{ width: `${frac * 100}%` }} />
        </div>
      )}
      {state !== 'ok' && <div className="fj-budget-state">Budget {STATE_TEXT[state]}</div>}
      {notice && model.connection === 'up' && (
        <div className="fj-notice" onClick={() => model.dismiss('')}>
          {notice}
        </div>
      )}
    </div>
  );
}

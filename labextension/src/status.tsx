/** The panel's first line: whether the control plane runs, and Start when it does not. */
import * as React from 'react';

import { FlashModel } from './model';

export function StatusView(props: { model: FlashModel }): JSX.Element | null {
  const { model } = props;
  const notice = model.notices.get('');
  switch (model.connection) {
    case 'connecting':
      return (
        <div className="fj-status" data-connection="connecting">
          Looking for the Flash control plane…
        </div>
      );
    case 'no-extension':
      return (
        <div className="fj-status fj-status-off" data-connection="no-extension">
          <p>The Flash panel cannot reach its server extension.</p>
          <p className="fj-hint">{model.message}</p>
        </div>
      );
    case 'down':
    case 'starting': {
      const starting = model.connection === 'starting';
      return (
        <div className="fj-status fj-status-off" data-connection={model.connection}>
          <p>The Flash control plane is not running on this machine.</p>
          <p className="fj-hint">
            {model.message ||
              'It starts by itself with the first remote call, or start it now to see and warm endpoints.'}
          </p>
          <button
            className="jp-mod-styled jp-mod-accept fj-start"
            disabled={starting}
            onClick={() => void model.startControlPlane()}
          >
            {starting ? 'Starting…' : 'Start'}
          </button>
          {notice && <p className="fj-notice">{notice}</p>}
        </div>
      );
    }
    case 'up':
      return null;
  }
}

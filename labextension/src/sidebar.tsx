/**
 * The Flash panel in Lab's left area: status, spend and budget, then one card per endpoint.
 * It re-renders when the model changes, and once a second while something on screen moves by
 * itself (a running cost, a countdown to scale-down) and the panel is visible.
 */
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { BudgetView } from './budget';
import { EndpointList } from './endpoints';
import { flashIcon } from './icon';
import { FlashModel } from './model';
import { StatusView } from './status';

function useModel(model: FlashModel): void {
  const [, setTick] = React.useState(0);
  React.useEffect(() => {
    const bump = () => setTick(t => t + 1);
    model.changed.connect(bump);
    return () => {
      model.changed.disconnect(bump);
    };
  }, [model]);
}

function useTicker(model: FlashModel, visible: () => boolean): void {
  const [, setTick] = React.useState(0);
  React.useEffect(() => {
    const id = window.setInterval(() => {
      if (visible() && model.ticking()) {
        setTick(t => t + 1);
      }
    }, 1000);
    return () => window.clearInterval(id);
  }, [model]);
}

function Panel(props: { model: FlashModel; visible: () => boolean }): JSX.Element {
  const { model } = props;
  useModel(model);
  useTicker(model, props.visible);
  return (
    <div
      className="fj-panel"
      data-connection={model.connection}
      data-synced={model.synced ? 'true' : 'false'}
    >
      <div className="fj-title">
        <span className="fj-title-text">Flash</span>
        {model.version && <span className="fj-hint">v{model.version}</span>}
      </div>
      <StatusView model={model} />
      {model.connection === 'up' && (
        <>
          <BudgetView model={model} />
          <EndpointList model={model} />
        </>
      )}
    </div>
  );
}

export class FlashSidebar extends ReactWidget {
  constructor(readonly model: FlashModel) {
    super();
    this.id = 'flash-jupyter-sidebar';
    this.title.icon = flashIcon;
    this.title.caption = 'Flash: endpoints, workers and cost';
    this.addClass('fj-sidebar');
  }

  render(): JSX.Element {
    return <Panel model={this.model} visible={() => this.isVisible} />;
  }
}

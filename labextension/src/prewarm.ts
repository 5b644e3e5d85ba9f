/**
 * Prewarm on intent: selecting a `%%flash` cell asks for its endpoint to be warmed, so running
 * it usually finds a warm worker. The server extension parses the magic line with the same
 * settings rules as running the cell. Each distinct line is warmed once per notebook.
 */
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';

import { api } from './api';

export type PrewarmMode = 'on-select' | 'on-open' | 'off';

const DEBOUNCE_MS = 300;

/** The magic line of a `%%flash` cell, or null. */
export function flashLine(source: string): string | null {
  const text = source.replace(/^\s*\n/, '');
  if (!text.startsWith('%%flash')) {
    return null;
  }
  const first = text.split('\n', 1)[0].trim();
  // "%%flashy" is not the magic
  return first === '%%flash' || /^%%flash\s/.test(first) ? first : null;
}

export class Prewarmer {
  mode: PrewarmMode = 'on-select';
  /** notebook path -> lines already warmed */
  private readonly warmed = new Map<string, Set<string>>();
  private timer: number | undefined;

  constructor(
    private readonly tracker: INotebookTracker,
    private readonly onWarm: (line: string, err: unknown) => void = () => undefined
  ) {
    tracker.activeCellChanged.connect(() => this.selected());
    tracker.widgetAdded.connect((_, panel) => void this.opened(panel));
  }

  useSettings(settings: ISettingRegistry.ISettings): void {
    const read = () => {
      const mode = settings.get('prewarm').composite as PrewarmMode;
      this.mode = mode === 'on-open' || mode === 'off' ? mode : 'on-select';
    };
    read();
    settings.changed.connect(read);
  }

  private selected(): void {
    window.clearTimeout(this.timer);
    if (this.mode !== 'on-select') {
      return;
    }
    // Debounced: arrowing through cells warms only where the user stops.
    this.timer = window.setTimeout(() => {
      const panel = this.tracker.currentWidget;
      const cell = this.tracker.activeCell;
      if (!panel || !cell || cell.model.type !== 'code') {
        return;
      }
      const line = flashLine(cell.model.sharedModel.getSource());
      if (line) {
        this.warm(panel, line);
      }
    }, DEBOUNCE_MS);
  }

  private async opened(panel: NotebookPanel): Promise<void> {
    await panel.context.ready;
    if (this.mode !== 'on-open') {
      return;
    }
    for (const cell of panel.content.model?.sharedModel.cells ?? []) {
      if (cell.cell_type === 'code') {
        const line = flashLine(cell.getSource());
        if (line) {
          this.warm(panel, line);
        }
      }
    }
  }

  private warm(panel: NotebookPanel, line: string): void {
    const key = panel.context.path;
    let seen = this.warmed.get(key);
    if (!seen) {
      seen = new Set();
      this.warmed.set(key, seen);
    }
    if (seen.has(line)) {
      return;
    }
    seen.add(line);
    const kernelId = panel.sessionContext.session?.kernel?.id;
    api.prewarm(line, kernelId).then(
      () => this.onWarm(line, null),
      err => {
        seen?.delete(line); // a refusal (bad line, no control plane) may succeed later
        this.onWarm(line, err);
      }
    );
  }
}

/**
 * Prewarm on intent: selecting a `%%flash` cell asks for its endpoint to be warmed, so running
 * it usually finds a warm worker. The server extension parses the magic line with the same
 * settings rules as running the cell. Each distinct line is warmed once per notebook.
 * Only trusted cells warm (notebooks Jupyter saved, or cells the user ran): opening someone
 * else's notebook must not start workers that cost money.
 */
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { PromiseDelegate } from '@lumino/coreutils';

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
  /** Resolved once the user's setting is known: nothing warms before, so a notebook opened
   * while the settings load is not missed by on-open, nor warmed under off. */
  private readonly settled = new PromiseDelegate<void>();

  constructor(
    private readonly tracker: INotebookTracker,
    private readonly onWarm: (line: string, err: unknown) => void = () => undefined
  ) {
    tracker.activeCellChanged.connect(() => this.selected());
    tracker.widgetAdded.connect((_, panel) => void this.opened(panel));
  }

  /** Follow the user's setting; null when there is none (no registry, or it failed to load):
   * then the default, on-select, holds. */
  useSettings(settings: ISettingRegistry.ISettings | null): void {
    if (settings) {
      const read = () => {
        const mode = settings.get('prewarm').composite as PrewarmMode;
        this.mode = mode === 'on-open' || mode === 'off' ? mode : 'on-select';
      };
      read();
      settings.changed.connect(read);
    }
    this.settled.resolve();
  }

  private selected(): void {
    window.clearTimeout(this.timer);
    if (this.mode !== 'on-select') {
      return;
    }
    // Debounced: arrowing through cells warms only where the user stops.
    this.timer = window.setTimeout(async () => {
      await this.settled.promise;
      if (this.mode !== 'on-select') {
        return;
      }
      const panel = this.tracker.currentWidget;
      const cell = this.tracker.activeCell;
      if (!panel || !cell || cell.model.type !== 'code' || !cell.model.trusted) {
        return;
      }
      const line = flashLine(cell.model.sharedModel.getSource());
      if (line) {
        this.warm(panel, line);
      }
    }, DEBOUNCE_MS);
  }

  private async opened(panel: NotebookPanel): Promise<void> {
    await Promise.all([panel.context.ready, this.settled.promise]);
    if (this.mode !== 'on-open') {
      return;
    }
    for (const cell of panel.content.model?.cells ?? []) {
      if (cell.type === 'code' && cell.trusted) {
        const line = flashLine(cell.sharedModel.getSource());
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

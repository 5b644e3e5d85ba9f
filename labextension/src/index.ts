/**
 * flash-jupyter's JupyterLab extension: the Flash panel (live endpoints, workers, cost, budget),
 * prewarm on intent, and their settings. Everything goes through the flash-jupyter server
 * extension under /flash-jupyter/api, with Jupyter's own authentication.
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { Token } from '@lumino/coreutils';

import { FlashModel } from './model';
import { Prewarmer } from './prewarm';
import { FlashSidebar } from './sidebar';

export const PLUGIN_ID = 'flash-jupyter:plugin';

/** The shared model: one events WebSocket per page, whatever uses it. */
export const IFlashModel = new Token<FlashModel>('flash-jupyter:IFlashModel');

/** The settings (schema/plugin.json) and the model every other plugin uses. */
const settingsPlugin: JupyterFrontEndPlugin<FlashModel> = {
  id: PLUGIN_ID,
  description: 'The Flash model and settings.',
  autoStart: true,
  provides: IFlashModel,
  activate: (): FlashModel => {
    const model = new FlashModel();
    void model.start();
    return model;
  }
};

const sidebarPlugin: JupyterFrontEndPlugin<void> = {
  id: 'flash-jupyter:sidebar',
  description: 'The Flash panel: endpoints, workers, cost and budget.',
  autoStart: true,
  requires: [IFlashModel],
  optional: [ILabShell, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    model: FlashModel,
    labShell: ILabShell | null,
    restorer: ILayoutRestorer | null
  ) => {
    const panel = new FlashSidebar(model);
    app.shell.add(panel, 'left', { rank: 450 });
    restorer?.add(panel, panel.id);
    app.commands.addCommand('flash-jupyter:open-panel', {
      label: 'Show the Flash panel',
      execute: () => {
        if (labShell) {
          labShell.activateById(panel.id);
        } else {
          app.shell.activateById(panel.id);
        }
      }
    });
  }
};

const prewarmPlugin: JupyterFrontEndPlugin<void> = {
  id: 'flash-jupyter:prewarm',
  description: "Warm a %%flash cell's endpoint when the cell is selected (or the notebook opens).",
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ISettingRegistry],
  activate: (
    _app: JupyterFrontEnd,
    tracker: INotebookTracker,
    registry: ISettingRegistry | null
  ) => {
    const prewarmer = new Prewarmer(tracker, (line, err) => {
      if (err) {
        console.warn(`flash-jupyter: could not prewarm "${line}":`, err);
      }
    });
    if (registry) {
      registry.load(PLUGIN_ID).then(
        settings => prewarmer.useSettings(settings),
        err => {
          console.warn('flash-jupyter: settings not loaded, prewarm stays on-select', err);
          prewarmer.useSettings(null);
        }
      );
    } else {
      prewarmer.useSettings(null);
    }
  }
};

export default [settingsPlugin, sidebarPlugin, prewarmPlugin];

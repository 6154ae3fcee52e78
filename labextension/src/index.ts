// jupyter-aifab's JupyterLab extension: the session at a glance (status bar), the "AI
// factory" side panel, and two commands. A client of /aifab/api/..., like the magics.
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { serveModel, stopServiceForm } from './forms';
import { FactoryPanel } from './panel';
import { SessionStatus } from './statusbar';

// a chip, drawn as an SVG string for LabIcon (static markup of ours, nothing from the session)
const factoryIcon = new LabIcon({
  name: 'jupyter-aifab:factory',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<path d="M7 7h10v10H7z M9 2h2v3H9z M13 2h2v3h-2z M9 19h2v3H9z M13 19h2v3h-2z ' +
    'M2 9h3v2H2z M2 13h3v2H2z M19 9h3v2h-3z M19 13h3v2h-3z"/></g></svg>'
});

const CATEGORY = 'AI factory';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-aifab:plugin',
  description: 'The AI factory panel, status bar and commands of jupyter-aifab sessions.',
  autoStart: true,
  optional: [ILabShell, IStatusBar, ICommandPalette, ILauncher],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null,
    launcher: ILauncher | null
  ) => {
    const panel = new FactoryPanel();
    panel.title.icon = factoryIcon;
    if (shell) {
      shell.add(panel, 'left', { rank: 900 });
    }
    if (statusBar) {
      statusBar.registerStatusItem('jupyter-aifab:session', {
        item: new SessionStatus(),
        align: 'left',
        rank: 900
      });
    }
    app.commands.addCommand('aifab:open-panel', {
      label: 'aifab: open the AI factory panel',
      execute: () => app.shell.activateById(panel.id)
    });
    app.commands.addCommand('aifab:serve', {
      label: 'aifab: serve a model…',
      icon: factoryIcon,
      execute: async () => {
        await serveModel();
        app.shell.activateById(panel.id);
      }
    });
    app.commands.addCommand('aifab:stop', {
      label: 'aifab: stop service…',
      icon: factoryIcon,
      execute: () => stopServiceForm()
    });
    for (const command of ['aifab:open-panel', 'aifab:serve', 'aifab:stop']) {
      palette?.addItem({ command, category: CATEGORY });
    }
    launcher?.add({ command: 'aifab:serve', category: CATEGORY, rank: 1 });
    launcher?.add({ command: 'aifab:stop', category: CATEGORY, rank: 2 });
  }
};

export default plugin;

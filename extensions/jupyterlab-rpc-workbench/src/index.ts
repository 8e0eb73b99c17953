/**
 * jupyterlab-rpc-workbench: the JupyterLab side of rpc-workbench
 * (docs/lab-extension.md in the repository is the contract).
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import {
  IEditorExtensionRegistry,
  IEditorLanguageRegistry
} from '@jupyterlab/codemirror';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { IStatusBar } from '@jupyterlab/statusbar';

import { addTokenClasses, watchNotebook } from './ccells';
import { connectInNotebook } from './connect';
import { DevicesPanel, FarmAction } from './devices';
import { KernelStates, showSessionDialog, StatusItem } from './status';

const CATEGORY = 'rpc-workbench';

const CommandIDs = {
  openDevices: 'workbench:open-devices',
  connect: 'workbench:connect',
  farmStart: 'workbench:farm-start',
  farmStop: 'workbench:farm-stop',
  showSession: 'workbench:show-session'
} as const;

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyterlab-rpc-workbench:plugin',
  description:
    'The Devices sidebar, the session status item and C highlighting of %%rpc_compile cells.',
  autoStart: true,
  requires: [
    INotebookTracker,
    IRenderMimeRegistry,
    IEditorExtensionRegistry,
    IEditorLanguageRegistry
  ],
  optional: [IStatusBar, ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    notebooks: INotebookTracker,
    rendermime: IRenderMimeRegistry,
    editorExtensions: IEditorExtensionRegistry,
    languages: IEditorLanguageRegistry,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    const { commands, shell } = app;
    const states = new KernelStates();

    addTokenClasses(editorExtensions);
    const watchPanel = (panel: NotebookPanel) => {
      watchNotebook(panel.content, languages);
      const watchKernel = () => {
        const kernel = panel.sessionContext.session?.kernel;
        if (kernel) {
          states.watch(kernel);
        }
      };
      panel.sessionContext.kernelChanged.connect(watchKernel);
      watchKernel();
    };
    notebooks.widgetAdded.connect((_, panel) => watchPanel(panel));
    notebooks.forEach(watchPanel);

    const panel = new DevicesPanel({
      connect: (key, tracker) =>
        void commands.execute(CommandIDs.connect, { key, tracker }),
      farm: action =>
        void commands.execute(
          action === 'start' ? CommandIDs.farmStart : CommandIDs.farmStop
        )
    });
    shell.add(panel, 'left', { rank: 650 });
    restorer?.add(panel, panel.id);

    commands.addCommand(CommandIDs.openDevices, {
      label: 'Show the Devices sidebar',
      caption: 'Trackers, their device keys and servers, and the farm',
      execute: () => shell.activateById(panel.id)
    });

    commands.addCommand(CommandIDs.connect, {
      label: args =>
        args.key
          ? `Connect to a "${args.key}" device in the notebook`
          : 'Connect in notebook',
      execute: async args => {
        const notebook = notebooks.currentWidget;
        if (!notebook) {
          Notification.warning(
            'Open a notebook first: "Connect in notebook" adds a cell to the active notebook.',
            { autoClose: 5000 }
          );
          return;
        }
        const tracker = typeof args.tracker === 'string' ? args.tracker : null;
        const entry = tracker === null ? undefined : panel.tracker(tracker);
        shell.activateById(notebook.id);
        await connectInNotebook(notebook, {
          key: typeof args.key === 'string' ? args.key : null,
          // the default tracker needs no --tracker; one we do not know gets it, to be sure
          tracker:
            tracker === null || entry?.default
              ? null
              : (entry?.address ?? tracker),
          loaded: states.ofNotebook(notebook)?.loaded === true
        });
      }
    });

    const farm = (action: FarmAction) => ({
      label: action === 'start' ? 'Start the farm' : 'Stop the farm',
      caption:
        action === 'start'
          ? "Start the lab's farm: a tracker and device servers on this machine"
          : "Stop the lab's farm",
      execute: () => panel.farmAction(action)
    });
    commands.addCommand(CommandIDs.farmStart, farm('start'));
    commands.addCommand(CommandIDs.farmStop, farm('stop'));

    commands.addCommand(CommandIDs.showSession, {
      label: 'Show the rpc-workbench session of this notebook',
      execute: () =>
        showSessionDialog(
          states.ofNotebook(notebooks.currentWidget),
          rendermime
        )
    });

    if (statusBar) {
      const item = new StatusItem(
        states,
        notebooks,
        () => void commands.execute(CommandIDs.showSession)
      );
      statusBar.registerStatusItem('jupyterlab-rpc-workbench:status', {
        item,
        align: 'left',
        rank: 4,
        isActive: () => item.isShown,
        activeStateChanged: item.activeChanged
      });
    }

    if (palette) {
      for (const command of [
        CommandIDs.openDevices,
        CommandIDs.farmStart,
        CommandIDs.farmStop,
        CommandIDs.showSession
      ]) {
        palette.addItem({ command, category: CATEGORY });
      }
    }
  }
};

export default plugin;

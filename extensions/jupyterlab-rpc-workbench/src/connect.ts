/**
 * "Connect in notebook": a new code cell below the active one with
 * `%rpc_connect --key K` (and `--tracker ADDR` for a tracker other than the
 * default), run at once.
 */
import { Notification } from '@jupyterlab/apputils';
import { NotebookActions, NotebookPanel } from '@jupyterlab/notebook';

/**
 * Keys and addresses come from a tracker's peers, and IPython expands `$name`
 * and `{expression}` in a magic's line: only these characters go into a cell.
 */
const SAFE_ARGUMENT = /^[\w.:@+\-/[\]]+$/;

export interface IConnectOptions {
  /** The device key, null for the farm's first one. */
  key: string | null;
  /** The tracker to ask, null for the default one. */
  tracker: string | null;
  /** Whether the kernel already loaded the workbench (no `%load_ext workbench` line then). */
  loaded: boolean;
}

/** The cell's source, or null when an argument cannot be written safely. */
export function connectSource(options: IConnectOptions): string | null {
  const args = options.key === null ? [] : ['--key', options.key];
  if (options.tracker !== null) {
    args.push('--tracker', options.tracker);
  }
  if (!args.every(arg => SAFE_ARGUMENT.test(arg))) {
    return null;
  }
  const lines = options.loaded ? [] : ['%load_ext workbench'];
  lines.push(['%rpc_connect', ...args].join(' '));
  return lines.join('\n');
}

/** Insert the cell below the active one of `panel` and run it. */
export async function connectInNotebook(
  panel: NotebookPanel,
  options: IConnectOptions
): Promise<void> {
  const source = connectSource(options);
  if (source === null) {
    Notification.error(
      `Cannot write %rpc_connect for the key ${JSON.stringify(options.key)}: ` +
        "the key or the tracker's address has characters that IPython would read as code.",
      { autoClose: 8000 }
    );
    return;
  }
  const notebook = panel.content;
  NotebookActions.insertBelow(notebook);
  NotebookActions.changeCellType(notebook, 'code'); // the default cell type may be markdown
  notebook.activeCell?.model.sharedModel.setSource(source);
  await NotebookActions.run(notebook, panel.sessionContext);
}

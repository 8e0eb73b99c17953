/**
 * The session state each kernel reports on the comm `workbench.status`, and
 * the status bar item that shows the active notebook's.
 *
 * The kernel opens the comm on `%load_ext workbench`; we also open one from
 * here when we first see a kernel, so that after a page reload a kernel that
 * already loaded the workbench tells its state again (a kernel without the
 * target just closes it).
 */
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

export const COMM_TARGET = 'workbench.status';

type SessionStatus = 'none' | 'waiting' | 'connected';

/**
 * What the kernel sends: the whole state, every time (docs/lab-extension.md).
 * The session's status is `status`, never `state`: nbclient and widget
 * managers take a comm message's `state` for a widget's.
 */
export interface IWorkbenchState {
  loaded: boolean;
  status?: SessionStatus;
  name: string | null;
  key: string | null;
  server: string | null;
  tracker: string | null;
  position: number | null;
  text: string;
  card_html: string | null;
}

/** The latest state of every kernel we saw, by kernel id. */
export class KernelStates {
  /** Emits the id of a kernel whose state changed. */
  get changed(): ISignal<this, string> {
    return this._changed;
  }

  get(kernelId: string | undefined): IWorkbenchState | undefined {
    return kernelId ? this._states.get(kernelId) : undefined;
  }

  /** The state of a notebook's kernel, if it has one. */
  ofNotebook(panel: NotebookPanel | null): IWorkbenchState | undefined {
    return this.get(panel?.sessionContext.session?.kernel?.id);
  }

  /** Listen to a kernel connection (once per connection). */
  watch(kernel: Kernel.IKernelConnection): void {
    if (this._watched.has(kernel)) {
      return;
    }
    this._watched.add(kernel);
    const id = kernel.id;
    kernel.registerCommTarget(COMM_TARGET, (comm, msg) => {
      this._listen(id, comm);
      this._set(id, msg.content.data as unknown as IWorkbenchState);
    });
    kernel.statusChanged.connect((_, status) => {
      if (['restarting', 'autorestarting', 'dead'].includes(status)) {
        this._set(id, undefined); // a new process: it has not loaded the workbench
      }
    });
    kernel.disposed.connect(() => this._watched.delete(kernel));

    const comm = kernel.createComm(COMM_TARGET);
    this._listen(id, comm);
    try {
      // a restart or shutdown before the kernel is idle again cancels this: nothing to ask then
      comm.open({}).done.catch(() => undefined);
    } catch {
      // the connection is already gone
    }
  }

  private _listen(kernelId: string, comm: Kernel.IComm): void {
    comm.onMsg = (msg: KernelMessage.ICommMsgMsg) =>
      this._set(kernelId, msg.content.data as unknown as IWorkbenchState);
    comm.onClose = (msg: KernelMessage.ICommCloseMsg) => {
      if (msg.content.data?.loaded === false) {
        this._set(kernelId, undefined); // %unload_ext workbench
      }
    };
  }

  private _set(kernelId: string, state: IWorkbenchState | undefined): void {
    if (state && typeof state === 'object') {
      this._states.set(kernelId, state);
    } else if (!this._states.delete(kernelId)) {
      return;
    }
    this._changed.emit(kernelId);
  }

  private _states = new Map<string, IWorkbenchState>();
  private _watched = new Set<Kernel.IKernelConnection>();
  private _changed = new Signal<this, string>(this);
}

/**
 * The status bar item: the text of the active notebook's kernel state. It is
 * active (shown) only once that kernel reported `loaded: true`.
 */
export class StatusItem extends Widget {
  constructor(
    private _states: KernelStates,
    private _notebooks: INotebookTracker,
    onClick: () => void
  ) {
    super();
    this.addClass('wb-status-item');
    this.node.title = 'rpc-workbench session: click for details';
    this.node.addEventListener('click', onClick);
    _states.changed.connect(this._update, this);
    _notebooks.currentChanged.connect(this._update, this);
    _notebooks.widgetAdded.connect((_, panel) => {
      panel.sessionContext.kernelChanged.connect(this._update, this);
    });
    _notebooks.forEach(panel =>
      panel.sessionContext.kernelChanged.connect(this._update, this)
    );
    this._update();
  }

  /** Emits when the item should be shown or hidden. */
  get activeChanged(): ISignal<this, void> {
    return this._activeChanged;
  }

  get isShown(): boolean {
    return this._shown;
  }

  private _update(): void {
    const state = this._states.ofNotebook(this._notebooks.currentWidget);
    const shown = state?.loaded === true;
    this.node.textContent = shown ? String(state.text ?? '') : '';
    this.node.dataset.state = shown ? String(state.status) : '';
    if (shown !== this._shown) {
      this._shown = shown;
      this._activeChanged.emit();
    }
  }

  private _shown = false;
  private _activeChanged = new Signal<this, void>(this);
}

/** The session card of a kernel state in a dialog: its HTML sanitized, or a line saying why there is none. */
export async function showSessionDialog(
  state: IWorkbenchState | undefined,
  rendermime: IRenderMimeRegistry
): Promise<void> {
  let body: Widget;
  if (state?.loaded && state.card_html) {
    const renderer = rendermime.createRenderer('text/html');
    await renderer.renderModel(
      rendermime.createModel({
        data: { 'text/html': state.card_html },
        trusted: false
      })
    );
    body = renderer;
  } else {
    body = new Widget();
    body.node.textContent = !state?.loaded
      ? "The workbench is not loaded in this notebook's kernel: run %load_ext workbench, " +
        'or use a key\'s "Connect in notebook" in the Devices sidebar.'
      : state.status === 'none'
        ? 'No session: connect with %rpc_connect, ' +
          'or with a key\'s "Connect in notebook" in the Devices sidebar.'
        : String(state.text ?? '');
  }
  body.addClass('wb-session-card');
  await showDialog({
    title: 'rpc-workbench session',
    body,
    buttons: [Dialog.okButton({ label: 'Close' })]
  });
}

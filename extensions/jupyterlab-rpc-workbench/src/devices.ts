/**
 * The Devices sidebar: the trackers the server extension knows (their keys and
 * servers), a field to add one, and the lab's farm. It polls
 * `workbench/api/trackers` every second while it is shown.
 *
 * Every string a tracker or server sent is put in the DOM as text
 * (textContent, dataset), never as HTML.
 */
import { Notification } from '@jupyterlab/apputils';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import {
  ApiError,
  IFarm,
  IKeyRow,
  IServerRow,
  ITracker,
  ITrackersReply,
  requestApi
} from './api';
import { devicesIcon } from './icon';

const POLL_MS = 1000;
const MAX_BACKOFF_MS = 10000; // while the API fails: 1, 2, 4, 8, 10, 10 ... s

export type FarmAction = 'start' | 'stop';

export interface IDevicesPanelOptions {
  /** A key's "Connect in notebook" button. */
  connect: (key: string, tracker: string) => void;
  /** The farm's Start and Stop buttons. */
  farm: (action: FarmAction) => void;
}

/** A tracker's element, rebuilt only when what it shows (but its status line) changes. */
interface ITrackerView {
  node: HTMLElement;
  status: HTMLElement;
  signature: string;
}

export class DevicesPanel extends Widget {
  constructor(options: IDevicesPanelOptions) {
    super();
    this._options = options;
    this.id = 'workbench-devices';
    this.addClass('wb-devices');
    this.title.icon = devicesIcon;
    this.title.caption = 'Devices (rpc-workbench)';

    this._input.type = 'text';
    this._input.placeholder = 'host:port';
    this._input.spellcheck = false;
    this._input.setAttribute('aria-label', 'Tracker address');
    this._input.addEventListener('keydown', event => {
      if (event.key === 'Enter') {
        void this._addTracker();
      }
    });
    this._addButton.addEventListener('click', () => void this._addTracker());
    this._startButton.addEventListener('click', () => options.farm('start'));
    this._stopButton.addEventListener('click', () => options.farm('stop'));
    this._apiStatus.hidden = true;
    this._farm.hidden = true;

    const form = h('div', 'wb-add-tracker-form');
    form.append(this._input, this._addButton);
    const buttons = h('div', 'wb-farm-buttons');
    buttons.append(this._startButton, this._stopButton);
    this._farm.append(
      h('h3', 'wb-section-title', 'Farm on this machine'),
      this._farmStatus,
      buttons,
      this._farmMessage
    );
    this._sections.hidden = true; // until the API first answers
    this._sections.append(
      h('h3', 'wb-section-title', 'Trackers'),
      this._list,
      form,
      this._addError,
      this._farm
    );
    const content = h('div', 'wb-devices-content');
    content.append(this._apiStatus, this._sections);
    this.node.append(h('h2', 'wb-title', 'Devices'), content);
  }

  /** The tracker of the last reply with this id or address. */
  tracker(idOrAddress: string): ITracker | undefined {
    return this._trackers.find(
      t => t.id === idOrAddress || t.address === idOrAddress
    );
  }

  /** Start or stop the lab's farm; a refusal is shown under its buttons (and as a notification when hidden). */
  async farmAction(action: FarmAction): Promise<void> {
    this._farmMessage.textContent = '';
    this._startButton.disabled = this._stopButton.disabled = true; // until the farm's next state
    try {
      this._renderFarm(await requestApi<IFarm>('farm', 'POST', { action }));
    } catch (error) {
      const message = `Could not ${action} the farm: ${errorText(error)}`;
      this._farmMessage.textContent = message;
      if (!this.isVisible) {
        Notification.error(message, { autoClose: 5000 });
      }
    }
    this._refresh();
  }

  dispose(): void {
    window.clearTimeout(this._timer);
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._refresh();
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    window.clearTimeout(this._timer);
  }

  /** Poll now (or as soon as the request in flight is answered). */
  private _refresh(): void {
    this._schedule(0);
  }

  private _schedule(delay: number): void {
    window.clearTimeout(this._timer);
    this._timer = window.setTimeout(() => void this._poll(), delay);
  }

  private async _poll(): Promise<void> {
    if (this._busy) {
      this._again = true;
      return;
    }
    this._busy = true;
    let delay = POLL_MS;
    try {
      const reply = await requestApi<ITrackersReply>('trackers');
      this._failures = 0;
      this._apiStatus.hidden = true;
      this._sections.hidden = false;
      this.removeClass('wb-mod-stale');
      this._trackers = Array.isArray(reply.trackers) ? reply.trackers : [];
      this._renderTrackers();
      this._renderFarm(reply.farm);
    } catch (error) {
      this._failures += 1;
      delay = Math.min(MAX_BACKOFF_MS, POLL_MS * 2 ** (this._failures - 1));
      this._apiStatus.textContent = `${apiFailureText(error)} Retrying in ${delay / 1000} s.`;
      this._apiStatus.hidden = false;
      this.addClass('wb-mod-stale');
    } finally {
      this._busy = false;
    }
    if (this._again) {
      this._again = false;
      delay = 0;
    }
    if (this.isVisible && !this.isDisposed) {
      this._schedule(delay);
    }
  }

  private _renderTrackers(): void {
    const now = Date.now() / 1000;
    const nodes: HTMLElement[] = [];
    const views = new Map<string, ITrackerView>();
    for (const tracker of this._trackers) {
      const signature = JSON.stringify([
        tracker.address,
        tracker.origin,
        tracker.default,
        tracker.keys,
        tracker.servers
      ]);
      let view = this._views.get(tracker.id);
      if (!view || view.signature !== signature) {
        const node = this._trackerNode(tracker);
        view?.node.replaceWith(node);
        view = {
          node,
          signature,
          status: node.querySelector('.wb-tracker-status') as HTMLElement
        };
      }
      view.status.textContent = statusText(tracker, now);
      view.node.dataset.status = String(tracker.status);
      views.set(tracker.id, view);
      nodes.push(view.node);
    }
    this._views = views;
    if (!nodes.length) {
      nodes.push(
        h(
          'div',
          'wb-empty',
          'No tracker yet: add one below, or start the farm.'
        )
      );
    }
    const current = Array.from(this._list.children);
    if (
      current.length !== nodes.length ||
      current.some((node, i) => node !== nodes[i])
    ) {
      this._list.replaceChildren(...nodes);
    }
  }

  private _trackerNode(tracker: ITracker): HTMLElement {
    const node = h('div', 'wb-tracker');
    node.dataset.address = String(tracker.address);

    const head = h('div', 'wb-tracker-head');
    head.append(h('span', 'wb-tracker-address', String(tracker.address)));
    head.append(h('span', 'wb-badge', String(tracker.origin)));
    if (tracker.default && tracker.origin !== 'default') {
      head.append(h('span', 'wb-badge', 'default'));
    }
    if (tracker.origin === 'added') {
      const remove = h('button', 'wb-tracker-remove wb-icon-button', '×');
      remove.title = `Remove ${tracker.address} from the list`;
      remove.setAttribute('aria-label', remove.title);
      remove.addEventListener('click', () => void this._remove(tracker));
      head.append(remove);
    }
    node.append(head, h('div', 'wb-tracker-status'));

    const keys = Array.isArray(tracker.keys) ? tracker.keys : [];
    node.append(
      keys.length
        ? table(
            'wb-keys',
            ['Key', 'Free', 'Total', 'Waiting', ''],
            keys.map(row => this._keyRow(row, tracker))
          )
        : h('div', 'wb-empty', 'No device key registered.')
    );
    const servers = Array.isArray(tracker.servers) ? tracker.servers : [];
    if (servers.length) {
      node.append(
        table(
          'wb-servers',
          ['Server', 'Key', 'Devices'],
          servers.map(serverRow)
        )
      );
    }
    return node;
  }

  private _keyRow(row: IKeyRow, tracker: ITracker): HTMLTableRowElement {
    const tr = h('tr', 'wb-key-row');
    tr.dataset.key = String(row.key);
    tr.append(
      h('td', 'wb-key', String(row.key)),
      h('td', 'wb-free wb-number', String(row.free)),
      h('td', 'wb-total wb-number', String(row.total)),
      h('td', 'wb-waiting wb-number', String(row.waiting))
    );
    const button = h('button', 'wb-connect wb-button', 'Connect in notebook');
    button.title = `Insert %rpc_connect --key ${row.key} in the active notebook and run it`;
    button.addEventListener('click', () =>
      this._options.connect(String(row.key), String(tracker.id))
    );
    const cell = h('td', 'wb-connect-cell');
    cell.append(button);
    tr.append(cell);
    return tr;
  }

  private _renderFarm(farm: IFarm | null | undefined): void {
    this._farm.hidden = !farm;
    if (!farm) {
      return;
    }
    const parts = [String(farm.state)];
    if (farm.state !== 'stopped') {
      if (farm.tracker) {
        parts.push(`tracker ${farm.tracker}`);
      }
      const servers = Object.entries(farm.servers ?? {});
      if (servers.length) {
        parts.push(servers.map(([key, n]) => `${key} × ${n}`).join(', '));
      }
    }
    if (farm.error) {
      parts.push(`error: ${farm.error}`);
    }
    this._farmStatus.textContent = parts.join(' · ');
    this._farmStatus.dataset.state = String(farm.state);
    this._startButton.disabled = farm.state !== 'stopped';
    this._stopButton.disabled = farm.state !== 'running';
  }

  private async _addTracker(): Promise<void> {
    const address = this._input.value.trim();
    if (!address) {
      this._addError.textContent = 'Type a tracker address first: host:port.';
      return;
    }
    this._addError.textContent = '';
    this._addButton.disabled = true;
    try {
      await requestApi('trackers', 'POST', { address });
      this._input.value = '';
    } catch (error) {
      this._addError.textContent = errorText(error);
    } finally {
      this._addButton.disabled = false;
    }
    this._refresh();
  }

  private async _remove(tracker: ITracker): Promise<void> {
    try {
      await requestApi(`trackers/${encodeURIComponent(tracker.id)}`, 'DELETE');
    } catch (error) {
      Notification.error(
        `Could not remove ${tracker.address}: ${errorText(error)}`,
        { autoClose: 5000 }
      );
    }
    this._refresh();
  }

  private _options: IDevicesPanelOptions;
  private _trackers: ITracker[] = [];
  private _views = new Map<string, ITrackerView>();
  private _timer = 0;
  private _busy = false;
  private _again = false;
  private _failures = 0;
  private _apiStatus = h('div', 'wb-api-status');
  private _sections = h('div', 'wb-sections');
  private _list = h('div', 'wb-trackers');
  private _input = h('input', 'wb-add-tracker-input');
  private _addButton = h('button', 'wb-add-tracker wb-button', 'Add tracker');
  private _addError = h('div', 'wb-add-tracker-error wb-error');
  private _farm = h('div', 'wb-farm');
  private _farmStatus = h('div', 'wb-farm-status');
  private _startButton = h('button', 'wb-farm-start wb-button', 'Start farm');
  private _stopButton = h('button', 'wb-farm-stop wb-button', 'Stop farm');
  private _farmMessage = h('div', 'wb-farm-message wb-error');
}

/** An element with classes and, optionally, text. */
function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

function table(
  className: string,
  headings: string[],
  rows: HTMLTableRowElement[]
): HTMLTableElement {
  const node = h('table', `wb-table ${className}`);
  const head = h('tr', '');
  head.append(...headings.map(text => h('th', '', text)));
  node.createTHead().append(head);
  node.createTBody().append(...rows);
  return node;
}

/** A server: its address with its arch and target below it (a sidebar is narrow), its key, its devices. */
function serverRow(row: IServerRow): HTMLTableRowElement {
  const tr = h('tr', 'wb-server-row');
  tr.dataset.address = String(row.address);
  const server = h('td', '');
  const details = h('div', 'wb-server-details');
  details.append(
    h('span', 'wb-server-arch', String(row.arch ?? '')),
    h('span', 'wb-server-target', String(row.target ?? ''))
  );
  server.append(h('div', 'wb-server-address', String(row.address)), details);
  tr.append(
    server,
    h('td', 'wb-server-key', String(row.key ?? '')),
    h('td', 'wb-server-devices', String(row.devices ?? ''))
  );
  return tr;
}

function statusText(tracker: ITracker, now: number): string {
  switch (tracker.status) {
    case 'ok':
      return tracker.updated === null
        ? 'ok'
        : `ok, updated ${Math.max(0, Math.round(now - tracker.updated))} s ago`;
    case 'unreachable':
      return `unreachable: ${tracker.error ?? 'no answer'}, retrying in ${Math.ceil(tracker.retry_in ?? 0)} s`;
    default:
      return 'connecting…';
  }
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function apiFailureText(error: unknown): string {
  if (error instanceof ApiError && error.status === 404) {
    return (
      'This Jupyter server has no rpc-workbench extension (404): install ' +
      'rpc-workbench with its "notebook" extra and restart JupyterLab.'
    );
  }
  return `The rpc-workbench server extension failed: ${errorText(error)}.`;
}

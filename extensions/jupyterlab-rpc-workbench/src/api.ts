/**
 * The REST API of the server extension (workbench/lab_extension.py), under
 * `{baseUrl}workbench/api/`: the JSON it sends and one function to call it.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface IKeyRow {
  key: string;
  free: number;
  total: number;
  waiting: number;
}

export interface IServerRow {
  address: string;
  key: string;
  arch: string;
  target: string;
  devices: string;
}

export interface ITracker {
  id: string;
  address: string;
  origin: 'default' | 'farm' | 'added';
  default: boolean;
  status: 'ok' | 'connecting' | 'unreachable';
  error: string | null;
  retry_in: number | null;
  updated: number | null;
  keys: IKeyRow[];
  servers: IServerRow[];
}

export interface IFarm {
  state: 'stopped' | 'starting' | 'running' | 'stopping';
  tracker: string | null;
  servers: Record<string, number> | null;
  error: string | null;
}

export interface ITrackersReply {
  trackers: ITracker[];
  farm: IFarm | null;
}

/** A failed call: `status` is the HTTP status, 0 when no answer came. */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
  }
}

/**
 * Call `workbench/api/{path}` with an optional JSON body; the reply's JSON
 * (null for an empty body). Errors carry the server's `message` when it sent one.
 */
export async function requestApi<T>(
  path: string,
  method = 'GET',
  body?: unknown
): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'workbench/api', path);
  const init: RequestInit = { method };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers = { 'Content-Type': 'application/json' };
  }
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ApiError(`no answer from the Jupyter server (${error})`, 0);
  }
  const text = await response.text();
  let data: unknown = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null; // an HTML error page, e.g. the 404 of a server without the extension
  }
  if (!response.ok) {
    const message = (data as { message?: unknown } | null)?.message;
    throw new ApiError(
      typeof message === 'string'
        ? message
        : `${response.status} ${response.statusText}`.trim(),
      response.status
    );
  }
  return data as T;
}

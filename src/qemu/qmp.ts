/**
 * A small async QMP client in the spirit of QEMU's own python `qemu.qmp`: one connection per qemu,
 * commands matched to replies by id (so several may be in flight), events delivered as a stream,
 * every command bounded by a timeout, and errors that carry QEMU's error class.
 */
import fs from 'node:fs';
import net from 'node:net';
import nodePath from 'node:path';
import { StringDecoder } from 'node:string_decoder';
import { setTimeout as sleep } from 'node:timers/promises';

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

/** The `{"QMP": ...}` banner qemu sends when a client connects. */
export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

/** QEMU answered `{"error": {"class", "desc"}}`. */
export class QmpError extends Error {
  readonly errorClass: string;
  readonly command: string;
  readonly desc: string;
  constructor(command: string, errorClass: string, desc: string) {
    super(`QMP command '${command}' failed: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

/** No answer in time. For execute() the connection stays usable; a late reply is dropped. */
export class QmpTimeoutError extends Error {
  readonly command: string;
  readonly timeoutMs: number;
  constructor(command: string, timeoutMs: number, message = `QMP command '${command}' got no reply within ${timeoutMs} ms`) {
    super(message);
    this.name = 'QmpTimeoutError';
    this.command = command;
    this.timeoutMs = timeoutMs;
  }
}

export class QmpClosedError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'QmpClosedError';
  }
}

export interface QmpConnectOptions {
  /** Bounds the whole handshake: socket retries, greeting and qmp_capabilities. */
  connectTimeoutMs?: number;
  /** Default timeout of execute() when the call gives none. */
  commandTimeoutMs?: number;
  signal?: AbortSignal;
}

const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const DEFAULT_COMMAND_TIMEOUT_MS = 30_000;
// qemu listens some tens of ms after exec (each wait is on the critical path of a guest start
// and of Prepare2): a watch on the socket's directory retries as soon as something appears there;
// these pauses only bound the wait where the watch sees nothing (no inotify, the directory not
// there yet), soon at first, then backing off.
const CONNECT_RETRY_FIRST_MS = 2;
const CONNECT_RETRY_MAX_MS = 50;
// qemu creates the socket asynchronously after exec; these mean "not listening yet".
const RETRYABLE_CONNECT_ERRORS = new Set(['ENOENT', 'ECONNREFUSED']);

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

type Message = Record<string, unknown>;

export class QmpClient {
  /** Resolves (never rejects) once the socket has closed: qemu exited, or close() was called. */
  readonly closed: Promise<void>;

  #socket: net.Socket;
  #commandTimeoutMs: number;
  #nextId = 1;
  #pending = new Map<number, Pending>();
  #eventListeners = new Set<(e: QmpEvent) => void>();
  #closeListeners = new Set<() => void>();
  #isClosed = false;
  #closeCause: Error | undefined;
  #onGreeting: ((msg: Message) => void) | null = null;
  #greeting!: QmpGreeting;
  #oob = false;

  private constructor(socket: net.Socket, commandTimeoutMs: number) {
    this.#socket = socket;
    this.#commandTimeoutMs = commandTimeoutMs;
    let resolveClosed!: () => void;
    this.closed = new Promise((resolve) => (resolveClosed = resolve));

    const decoder = new StringDecoder('utf8');
    let partial: string[] = [];
    socket.on('data', (chunk: Buffer) => {
      // Split on newlines without rescanning earlier data, so multi-megabyte replies stay linear.
      let text = decoder.write(chunk);
      let nl: number;
      while ((nl = text.indexOf('\n')) !== -1 && !socket.destroyed) {
        partial.push(text.slice(0, nl));
        const line = partial.join('');
        partial = [];
        text = text.slice(nl + 1);
        this.#handleLine(line);
      }
      if (text) partial.push(text);
    });
    socket.on('error', (err) => (this.#closeCause ??= err));
    socket.on('close', () => {
      this.#isClosed = true;
      const cause = this.#closeCause;
      for (const [id, p] of this.#pending) {
        clearTimeout(p.timer);
        this.#pending.delete(id);
        p.reject(new QmpClosedError(`QMP connection closed before '${p.command}' was answered`, { cause }));
      }
      for (const listener of [...this.#closeListeners]) listener();
      resolveClosed();
    });
  }

  /**
   * Connects to a qemu QMP socket, reads the greeting and negotiates capabilities. Retries while
   * the socket does not exist or refuses, since qemu creates it asynchronously. Note that qemu
   * serves one client at a time: while another client is connected, the connection is accepted
   * by the kernel but the greeting only comes once that client leaves (or the timeout hits).
   */
  static async connect(socketPath: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    const socket = await openSocket(socketPath, deadline, timeoutMs, opts.signal);
    const client = new QmpClient(socket, opts.commandTimeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS);
    try {
      client.#greeting = await client.#waitForGreeting(socketPath, deadline, timeoutMs, opts.signal);
      // Out-of-band execution lets a command through while the main loop is blocked (migrate-pause of a stream hung on a dead link).
      const oob = client.#greeting.capabilities?.includes('oob') === true;
      await client.execute('qmp_capabilities', oob ? { enable: ['oob'] } : undefined, { timeoutMs: Math.max(deadline - Date.now(), 1) });
      client.#oob = oob;
      return client;
    } catch (err) {
      socket.destroy();
      throw err;
    }
  }

  get greeting(): QmpGreeting {
    return this.#greeting;
  }

  get isClosed(): boolean {
    return this.#isClosed;
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts?: { timeoutMs?: number }): Promise<T> {
    return this.#send('execute', command, args, opts);
  }

  /**
   * Runs a command out of band when qemu offers it (and the command allows it): answered even while
   * qemu's main loop is blocked, as it is when a postcopy stream hangs on a dead link. In band otherwise.
   */
  executeOob<T = unknown>(command: string, args?: Record<string, unknown>, opts?: { timeoutMs?: number }): Promise<T> {
    return this.#send(this.#oob ? 'exec-oob' : 'execute', command, args, opts);
  }

  #send<T>(kind: 'execute' | 'exec-oob', command: string, args: Record<string, unknown> | undefined, opts: { timeoutMs?: number } | undefined): Promise<T> {
    // destroyed: close() was called and the 'close' event is still on its way.
    if (this.#isClosed || this.#socket.destroyed) {
      return Promise.reject(new QmpClosedError(`QMP connection is closed; cannot run '${command}'`, { cause: this.#closeCause }));
    }
    const id = this.#nextId++;
    const timeoutMs = opts?.timeoutMs ?? this.#commandTimeoutMs;
    const message = args === undefined ? { [kind]: command, id } : { [kind]: command, arguments: args, id };
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new QmpTimeoutError(command, timeoutMs));
      }, timeoutMs);
      this.#pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.#socket.write(JSON.stringify(message) + '\n');
    });
  }

  /** Runs a human monitor command and returns its text output. */
  hmp(commandLine: string, opts?: { timeoutMs?: number }): Promise<string> {
    return this.execute<string>('human-monitor-command', { 'command-line': commandLine }, opts);
  }

  /** How many event listeners are subscribed: what lets a check see that a job's listeners left with it. */
  get eventListenerCount(): number {
    return this.#eventListeners.size;
  }

  /** Calls listener for every event; returns the unsubscribe function. */
  onEvent(listener: (e: QmpEvent) => void): () => void {
    this.#eventListeners.add(listener);
    return () => this.#eventListeners.delete(listener);
  }

  /**
   * Events from now on (optionally only the named ones), buffered until read. Ends when the
   * connection closes; leaving a for-await loop (or calling return()) unsubscribes.
   */
  events(filter?: string | string[]): AsyncIterableIterator<QmpEvent> {
    const names = filter === undefined ? null : new Set(typeof filter === 'string' ? [filter] : filter);
    const queue: QmpEvent[] = [];
    let waiters: (() => void)[] = [];
    let done = this.#isClosed;
    const wake = () => {
      const w = waiters;
      waiters = [];
      for (const resolve of w) resolve();
    };
    const unsubscribeEvents = this.onEvent((e) => {
      if (names && !names.has(e.event)) return;
      queue.push(e);
      wake();
    });
    const onClose = () => {
      done = true;
      wake();
    };
    this.#closeListeners.add(onClose);
    const finish = () => {
      done = true;
      unsubscribeEvents();
      this.#closeListeners.delete(onClose);
      wake();
    };
    const iterator: AsyncIterableIterator<QmpEvent> = {
      [Symbol.asyncIterator]: () => iterator,
      next: async () => {
        while (queue.length === 0 && !done) await new Promise<void>((resolve) => waiters.push(resolve));
        if (queue.length > 0) return { value: queue.shift()!, done: false };
        finish();
        return { value: undefined, done: true };
      },
      return: async () => {
        queue.length = 0;
        finish();
        return { value: undefined, done: true };
      },
    };
    return iterator;
  }

  /**
   * Resolves with the first matching event from now on. Start waiting before issuing the command
   * that causes the event: qemu often sends the event before the command's reply.
   */
  waitForEvent(
    name: string | string[],
    opts: { timeoutMs: number; predicate?: (e: QmpEvent) => boolean; signal?: AbortSignal },
  ): Promise<QmpEvent> {
    const names = new Set(typeof name === 'string' ? [name] : name);
    const label = [...names].join('|');
    if (opts.signal?.aborted) return Promise.reject(opts.signal.reason);
    if (this.#isClosed) return Promise.reject(new QmpClosedError(`QMP connection is closed; cannot wait for ${label}`));
    return this.#settleOnce<QmpEvent>({
      timeoutMs: opts.timeoutMs,
      onTimeout: () => new QmpTimeoutError(`event ${label}`, opts.timeoutMs, `no ${label} event within ${opts.timeoutMs} ms`),
      onClose: () => new QmpClosedError(`QMP connection closed while waiting for ${label}`, { cause: this.#closeCause }),
      signal: opts.signal,
      arm: (resolve, reject) =>
        this.onEvent((e) => {
          if (!names.has(e.event)) return;
          try {
            if (opts.predicate && !opts.predicate(e)) return;
          } catch (err) {
            return reject(err);
          }
          resolve(e);
        }),
    });
  }

  /** Drops the connection (qemu keeps running); in-flight commands reject with QmpClosedError. */
  close(): Promise<void> {
    this.#socket.destroy();
    return this.closed;
  }

  #handleLine(line: string): void {
    if (line.trim() === '') return;
    let msg: Message;
    try {
      msg = JSON.parse(line) as Message;
    } catch {
      return this.#protocolError(`unparsable QMP message: ${line.slice(0, 200)}`);
    }
    if (typeof msg !== 'object' || msg === null) return this.#protocolError(`unexpected QMP message: ${line.slice(0, 200)}`);

    if (this.#onGreeting) return this.#onGreeting(msg);
    if (typeof msg.event === 'string') return this.#dispatchEvent(msg);
    if ('return' in msg || 'error' in msg) {
      // Unknown ids are replies to commands that already timed out: drop them.
      const pending = typeof msg.id === 'number' ? this.#pending.get(msg.id) : undefined;
      if (!pending) return;
      clearTimeout(pending.timer);
      this.#pending.delete(msg.id as number);
      if ('return' in msg) return pending.resolve(msg.return);
      const error = (msg.error ?? {}) as { class?: unknown; desc?: unknown };
      return pending.reject(new QmpError(pending.command, String(error.class ?? 'GenericError'), String(error.desc ?? '')));
    }
    this.#protocolError(`unexpected QMP message: ${line.slice(0, 200)}`);
  }

  #dispatchEvent(msg: Message): void {
    const event: QmpEvent = {
      event: msg.event as string,
      // qemu omits `data` for events without payload (RESUME, STOP).
      data: (msg.data ?? {}) as Record<string, unknown>,
      timestamp: msg.timestamp as QmpEvent['timestamp'],
    };
    for (const listener of [...this.#eventListeners]) {
      try {
        listener(event);
      } catch (err) {
        // A faulty listener must not stop the reader (and with it every pending command).
        process.emitWarning(`QMP event listener threw on ${event.event}: ${String(err)}`);
      }
    }
  }

  #protocolError(message: string): void {
    this.#socket.destroy(new Error(message));
  }

  #waitForGreeting(path: string, deadline: number, timeoutMs: number, signal?: AbortSignal): Promise<QmpGreeting> {
    return this.#settleOnce<QmpGreeting>({
      timeoutMs: Math.max(deadline - Date.now(), 1),
      onTimeout: () =>
        new QmpTimeoutError('greeting', timeoutMs, `connected to ${path} but got no QMP greeting within ${timeoutMs} ms (is another client connected?)`),
      onClose: () => new QmpClosedError('QMP connection closed before the greeting', { cause: this.#closeCause }),
      signal,
      arm: (resolve, reject) => {
        this.#onGreeting = (msg) => {
          const qmp = msg.QMP as QmpGreeting | undefined;
          if (qmp && typeof qmp === 'object') resolve(qmp);
          else reject(new Error(`expected a QMP greeting, got: ${JSON.stringify(msg).slice(0, 200)}`));
        };
        return () => {
          this.#onGreeting = null;
        };
      },
    });
  }

  /**
   * The frame of every wait on this connection: settles once, on what `arm` reports, on the
   * timeout, on the connection closing or on the signal, and always removes what it added.
   * `arm` installs the listener and returns how to remove it.
   */
  #settleOnce<T>(o: {
    timeoutMs: number;
    onTimeout: () => Error;
    onClose: () => Error;
    signal?: AbortSignal;
    arm: (resolve: (value: T) => void, reject: (err: unknown) => void) => () => void;
  }): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let disarm = () => {};
      const settle = (fn: () => void) => {
        clearTimeout(timer);
        disarm();
        this.#closeListeners.delete(onClose);
        o.signal?.removeEventListener('abort', onAbort);
        fn();
      };
      const timer = setTimeout(() => settle(() => reject(o.onTimeout())), o.timeoutMs);
      const onClose = () => settle(() => reject(o.onClose()));
      this.#closeListeners.add(onClose);
      const onAbort = () => settle(() => reject(o.signal!.reason));
      o.signal?.addEventListener('abort', onAbort, { once: true });
      disarm = o.arm(
        (value) => settle(() => resolve(value)),
        (err) => settle(() => reject(err)),
      );
    });
  }
}

async function openSocket(path: string, deadline: number, timeoutMs: number, signal?: AbortSignal): Promise<net.Socket> {
  // Watching from before the first attempt: a socket made between an attempt and its pause still wakes it.
  const appeared = watchDirectory(path);
  try {
    for (let retryMs = CONNECT_RETRY_FIRST_MS; ; ) {
      signal?.throwIfAborted();
      try {
        return await connectOnce(path, Math.max(deadline - Date.now(), 1));
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code ?? '';
        if (!RETRYABLE_CONNECT_ERRORS.has(code)) throw err;
        if (Date.now() + retryMs > deadline) {
          throw new QmpTimeoutError('connect', timeoutMs, `could not connect to QMP socket ${path} within ${timeoutMs} ms (${code})`);
        }
        // An abort ends the pause early; the loop head then throws the abort reason. qemu binds
        // its socket (the change seen) a moment before it listens: after a change, soon again.
        const changed = await appeared.pause(retryMs, signal);
        retryMs = changed ? CONNECT_RETRY_FIRST_MS : Math.min(retryMs * 2, CONNECT_RETRY_MAX_MS);
      }
    }
  } finally {
    appeared.close();
  }
}

/**
 * Pauses that end early when `file` is made, renamed or removed in its directory (inotify), and
 * say whether they did. A change seen while no pause runs ends the next one at once. Without a
 * watch (the directory does not exist yet, no inotify) a pause lasts its full time.
 */
function watchDirectory(file: string): { pause(ms: number, signal?: AbortSignal): Promise<boolean>; close(): void } {
  let changed = false;
  let wake: (() => void) | undefined;
  let watcher: fs.FSWatcher | undefined;
  const name = nodePath.basename(file);
  try {
    watcher = fs.watch(nodePath.dirname(file), { persistent: false }, (_event, entry) => {
      if (entry !== null && entry !== name) return;
      changed = true;
      wake?.();
    });
    watcher.on('error', () => watcher?.close());
  } catch {
    watcher = undefined;
  }
  return {
    pause: async (ms, signal) => {
      if (!changed) {
        const ac = new AbortController();
        wake = () => ac.abort();
        const onAbort = () => ac.abort();
        signal?.addEventListener('abort', onAbort, { once: true });
        await sleep(ms, undefined, { signal: ac.signal }).catch(() => undefined);
        signal?.removeEventListener('abort', onAbort);
        wake = undefined;
      }
      const seen = changed;
      changed = false;
      return seen;
    },
    close: () => watcher?.close(),
  };
}

function connectOnce(path: string, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(path);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new QmpTimeoutError('connect', timeoutMs, `connecting to QMP socket ${path} timed out`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeListener('error', onError);
      resolve(socket);
    });
    const onError = (err: Error) => {
      clearTimeout(timer);
      reject(err);
    };
    socket.once('error', onError);
  });
}

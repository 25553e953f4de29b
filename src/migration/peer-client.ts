import { Agent, request } from 'undici';
import { AgentError } from '../errors.js';
import type { TlsMaterial } from '../agent/tls.js';

/** The peer answered with an HTTP error: a definite refusal, carrying the peer's code. */
export class PeerRefusedError extends AgentError {
  readonly peerStatus: number;
  /** A 400 unknown_property's list: what of the request the peer does not know (an older agent). */
  readonly unknownProperties: string[];
  constructor(peerStatus: number, body: { code?: string; message?: string; unknownProperties?: unknown }, url: string, retryAfterSeconds?: number) {
    super(
      502,
      body.code ?? 'peer_refused',
      `peer ${url} refused: ${peerStatus} ${body.message ?? ''}`.trim(),
      { peerStatus, ...(retryAfterSeconds !== undefined ? { retryAfterSeconds } : {}) },
    );
    this.peerStatus = peerStatus;
    this.unknownProperties = Array.isArray(body.unknownProperties) ? body.unknownProperties.filter((p): p is string => typeof p === 'string') : [];
  }
  get retryAfterSeconds(): number | undefined {
    return this.details.retryAfterSeconds as number | undefined;
  }
}

/** The peer could not be reached or did not answer in time: the outcome of the request is unknown. */
export class PeerUnreachableError extends AgentError {
  constructor(url: string, cause: unknown, code = 'peer_unreachable') {
    super(502, code, `peer ${url} ${code === 'peer_unreachable' ? 'unreachable' : 'failed'}: ${(cause as Error)?.message ?? String(cause)}`);
  }
}

/**
 * The peer was reached but its certificate is not one this agent accepts (another CA's, revoked,
 * expired, not naming the host called): nothing was sent to it. Node's codes for these.
 */
const CERTIFICATE_REFUSALS = new Set([
  'CERT_REVOKED', 'CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID', 'CERT_SIGNATURE_FAILURE', 'CERT_UNTRUSTED', 'CERT_REJECTED',
  'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'INVALID_CA', 'INVALID_PURPOSE', 'HOSTNAME_MISMATCH', 'ERR_TLS_CERT_ALTNAME_INVALID',
  'UNABLE_TO_GET_CRL', 'CRL_HAS_EXPIRED', 'CRL_SIGNATURE_FAILURE',
]);

/** A peer whose certificate this agent refuses: the TLS handshake failed, so it got nothing. */
export class PeerCertificateError extends PeerUnreachableError {
  constructor(url: string, cause: Error & { code: string }) {
    super(url, cause, 'peer_certificate_rejected');
    this.message = `peer ${url} presented a certificate this agent does not accept (${cause.code}): ${cause.message}`;
  }
}

function connectError(url: string, err: unknown): PeerUnreachableError {
  const tlsError = err as Error & { code?: string };
  return tlsError.code && CERTIFICATE_REFUSALS.has(tlsError.code) ? new PeerCertificateError(url, tlsError as Error & { code: string }) : new PeerUnreachableError(url, err);
}

const MAX_ANSWER_BYTES = 1024 * 1024;

/**
 * Agent-to-agent HTTP (undici), bounded in time for every call. With TLS the agent is known by
 * its certificate (mutual TLS, the peer's checked against the fleet's CA and the host it is
 * called by) and presents no token; without TLS it presents its own token. It never carries a
 * caller's credential.
 */
export class PeerClient {
  private readonly dispatcher: Agent;
  private readonly token?: string;

  constructor(opts: { token?: string; tls?: TlsMaterial }) {
    this.token = opts.tls ? undefined : opts.token;
    const tls = opts.tls ? { ca: opts.tls.ca, cert: opts.tls.cert, key: opts.tls.key, ...(opts.tls.crl ? { crl: opts.tls.crl } : {}) } : {};
    this.dispatcher = new Agent({ connect: { timeout: 5000, ...tls }, keepAliveTimeout: 10_000 });
  }

  async call<T>(baseUrl: string, method: 'GET' | 'POST', path: string, body?: unknown, timeoutMs = 30_000, signal?: AbortSignal): Promise<T> {
    const url = new URL(path, baseUrl).toString();
    let res;
    try {
      res = await request(url, {
        method,
        dispatcher: this.dispatcher,
        headers: {
          ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
          ...(this.token ? { authorization: `Bearer ${this.token}` } : {}),
        },
        body: body !== undefined ? JSON.stringify(body) : undefined,
        headersTimeout: timeoutMs,
        bodyTimeout: timeoutMs,
        ...(signal ? { signal } : {}),
      });
    } catch (err) {
      throw connectError(url, err);
    }
    let text: string;
    try {
      const chunks: Buffer[] = [];
      let size = 0;
      for await (const chunk of res.body) {
        size += (chunk as Buffer).length;
        // Protocol answers are a few hundred bytes; a peer that sends more is not a peer.
        if (size > MAX_ANSWER_BYTES) {
          res.body.destroy();
          throw new PeerUnreachableError(url, new Error(`answer larger than ${MAX_ANSWER_BYTES} bytes`), 'peer_failed');
        }
        chunks.push(chunk as Buffer);
      }
      text = Buffer.concat(chunks).toString('utf8');
    } catch (err) {
      throw err instanceof PeerUnreachableError ? err : new PeerUnreachableError(url, err);
    }
    let parsed: unknown;
    try {
      parsed = text ? JSON.parse(text) : {};
    } catch {
      // Not an agent's answer: say what it was, not what it said (a caller-chosen URL could be any service).
      parsed = { message: `a non-JSON answer of ${Buffer.byteLength(text)} bytes` };
    }
    // A 5xx is the peer failing, not deciding: the outcome stays unknown (503 is a retryable "not now").
    if (res.statusCode >= 500 && res.statusCode !== 503) {
      const failed = parsed as { code?: string; message?: string };
      throw new PeerUnreachableError(url, new Error(`HTTP ${res.statusCode}: ${failed.message ?? ''}`), failed.code ?? 'peer_failed');
    }
    if (res.statusCode >= 400) {
      const retryAfter = Number(res.headers['retry-after']);
      throw new PeerRefusedError(res.statusCode, parsed as { code?: string }, url, Number.isFinite(retryAfter) ? retryAfter : undefined);
    }
    return parsed as T;
  }

  async close(): Promise<void> {
    await this.dispatcher.close();
  }
}

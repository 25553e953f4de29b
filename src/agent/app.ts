import { describeUserfaultfdAccess, userfaultfdAccess } from '../qemu/userfaultfd.js';
import { mkdir } from 'node:fs/promises';
import { isIP } from 'node:net';
import type { TLSSocket } from 'node:tls';
import os from 'node:os';
import { constants as cryptoConstants } from 'node:crypto';
import type { Server } from 'node:http';
import Fastify, { type FastifyError, type FastifyHttpOptions, type FastifyInstance, type FastifyServerOptions } from 'fastify';
import swagger from '@fastify/swagger';
import { AgentError } from '../errors.js';
import { secretsMatch } from '../secrets.js';
import { validateConfig, type AgentConfig } from '../config.js';
import { StateStore } from '../store/state-store.js';
import { StateDirLock } from '../store/dir-lock.js';
import { checkTlsMaterial, loadTls, writeQemuTlsDir, type TlsMaterial } from './tls.js';
import { probeQemu, resolveAccel, type QemuHostInfo } from '../qemu/host.js';
import { chooseAccel } from '../qemu/accel-probe.js';
import type { Accel } from '../domain/index.js';
import { DomainManager } from './domain-manager.js';
import { QemuUsers } from './qemu-user.js';
import { XmlPool } from './xml-pool.js';
import { MigrationService } from '../migration/service.js';
import { PROTOCOL_VERSIONS } from '../migration/phases.js';
import { domainInfoSchema, errorSchema, fillMeasurementSchema } from '../../routes/schemas.js';
import healthRoutes from '../../routes/health.js';
import hostRoutes from '../../routes/host.js';
import domainRoutes from '../../routes/domains.js';
import migrationRoutes from '../../routes/migration.js';
import jobRoutes from '../../routes/jobs.js';
import documentationRoutes from '../../routes/documentation.js';
import { jobSchema } from '../../routes/job-schema.js';
import { channelLimit, streamTransportSchema } from '../migration/params.js';
import { version } from './version.js';
import type { AccelProbeReport, HostInfo } from '../host-info.js';

/** What the routes reach through `app.agent`. */
export interface AgentContext {
  config: AgentConfig;
  store: StateStore;
  qemu: QemuHostInfo;
  domains: DomainManager;
  migrations: MigrationService;
  hostInfo(): HostInfo;
}

declare module 'fastify' {
  interface FastifyInstance {
    agent: AgentContext;
  }
  interface FastifyContextConfig {
    /** Route served without the bearer token (only /health). */
    public?: boolean;
    /** A protocol route between agents (Prepare2, Finish2): with TLS, for peers' certificates only. */
    peer?: boolean;
  }
}

/**
 * --accel auto runs guests on KVM wherever it works, but KVM can work and still be far slower
 * than TCG (nested without EPT); the agent measures once, after start, says so in its log and in
 * GET /host. Off the start path: it takes up to a few seconds on exactly such hosts.
 */
class BackgroundAccelProbe {
  report: AccelProbeReport;
  private readonly abort = new AbortController();
  private readonly done: Promise<void> = Promise.resolve();

  constructor(app: FastifyInstance, config: AgentConfig, qemu: QemuHostInfo, accel: Accel) {
    if (config.accel !== 'auto') {
      this.report = { state: 'not-measured', reason: `--accel ${config.accel} was given` };
      return;
    }
    this.report = { state: 'measuring' };
    this.done = chooseAccel(qemu.binary, qemu.kvmUsable, { signal: this.abort.signal }).then(
      (choice) => {
        if (this.abort.signal.aborted) return;
        const kvmSlow = accel === 'kvm' && choice.accel === 'tcg';
        this.report = { state: 'measured', kvmSlow, ...choice };
        if (kvmSlow) app.log.warn({ accelProbe: choice }, `KVM is slow on this host, guests would run faster with --accel tcg: ${choice.reason}`);
        else app.log.info({ accelProbe: choice }, `accelerator measured: ${choice.reason}`);
      },
      (err: Error) => {
        this.report = { state: 'not-measured', reason: `the measurement failed: ${err.message}` };
      },
    );
  }

  async stop(): Promise<void> {
    this.abort.abort();
    await this.done;
  }
}

/** The name or address in a Host header, without port or IPv6 brackets; undefined when malformed. */
function hostnameOf(header: string | undefined): string | undefined {
  const m = header ? /^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+))(?::\d{1,5})?$/.exec(header) : null;
  return m ? (m[1] ?? m[2]!).toLowerCase() : undefined;
}

/** A request that failed its schema; unknown properties are named, all of them. */
function validationError(err: FastifyError): { code: string; message: string; unknownProperties?: string[] } {
  const unknown = (err.validation ?? []).filter((v) => v.keyword === 'additionalProperties');
  if (unknown.length === 0) return { code: 'invalid_request', message: err.message };
  const names = unknown.flatMap((v) => {
    const known = Object.keys((v as { parentSchema?: { properties?: object } }).parentSchema?.properties ?? {});
    const data = (v as { data?: unknown }).data;
    const extra = data && typeof data === 'object' ? Object.keys(data).filter((k) => !known.includes(k)) : [String(v.params.additionalProperty)];
    return extra.map((k) => (v.instancePath ? `${v.instancePath.slice(1).replace(/\//g, '.')}.${k}` : k));
  });
  const where = err.validationContext ?? 'request';
  return {
    code: 'unknown_property',
    message: `unknown ${where} propert${names.length === 1 ? 'y' : 'ies'}: ${names.join(', ')}`,
    unknownProperties: names,
  };
}

/**
 * Why this very connection shows no verified certificate of the fleet's CA (not merely
 * `authorized`: see the session tickets below); undefined when it does.
 */
function peerCertificateRefusal(socket: TLSSocket): string | undefined {
  if (socket.isSessionReused() || Object.keys(socket.getPeerCertificate()).length === 0) return 'none was presented';
  // e.g. CERT_REVOKED (--tls-crl), UNABLE_TO_VERIFY_LEAF_SIGNATURE (another CA's)
  if (!socket.authorized) return `the one presented was refused: ${String(socket.authorizationError)}`;
  return undefined;
}

function tokenMatches(header: string | undefined, token: string): boolean {
  return secretsMatch(/^Bearer (.+)$/.exec(header ?? '')?.[1], token);
}

/**
 * Build an agent: state store, qemu probe, domain manager, migration service and the HTTP app.
 * Nothing listens until the caller says so (tests listen on port 0). Closing the app closes
 * QMP connections but never ends a guest: guests outlive their agent.
 */
export async function buildAgent(
  rawConfig: AgentConfig,
  opts: { logger?: FastifyServerOptions['logger'] } = {},
): Promise<FastifyInstance> {
  const config = validateConfig(rawConfig);
  const tls = config.tls ? loadTls(config.tls) : undefined;
  const tlsWarnings = config.tls && tls ? await checkTlsMaterial(config.tls, tls) : [];
  const serverTimeouts = { headersTimeout: Math.min(config.requestTimeoutMs, 10_000), connectionsCheckingInterval: Math.min(config.requestTimeoutMs, 1000) };
  // With TLS every caller must speak HTTPS; a client certificate is asked for, and required
  // (checked per route) only on the protocol routes: operators authenticate with the token.
  // No session tickets: Node reports a resumed session as authorized though no certificate was
  // shown on it, and without tickets (and no session cache) every connection shows its own.
  const https = tls
    ? { key: tls.key, cert: tls.cert, ca: tls.ca, ...(tls.crl ? { crl: tls.crl } : {}), requestCert: true, rejectUnauthorized: false, secureOptions: cryptoConstants.SSL_OP_NO_TICKET, ...serverTimeouts }
    : null;
  const options = {
    logger: opts.logger ?? false,
    bodyLimit: config.bodyLimitBytes,
    // Job and domain routes answer in milliseconds; a long ?wait=true Perform is the exception.
    connectionTimeout: 0,
    // Receiving a request (headers and body) is bounded, so slow senders cannot hold sockets;
    // answering is not (a ?wait=true Perform answers when its migration ends).
    requestTimeout: config.requestTimeoutMs,
    http: serverTimeouts,
    https,
    // Fastify's default strips unknown properties, so a misspelled option (`bandwidht`) would
    // silently run the migration with defaults; refuse them instead, naming them (verbose gives
    // the error its schema, which says which properties are known).
    ajv: { customOptions: { removeAdditional: false, verbose: true } },
  };
  // One agent, HTTP or HTTPS: Fastify's types tell the two apart by server type alone.
  const app = Fastify(options as unknown as FastifyHttpOptions<Server>);
  for (const warning of tlsWarnings) app.log.warn(warning);

  await mkdir(config.stateDir, { recursive: true, mode: 0o700 });
  // Before anything below reads or repairs the directory: a second agent on it stops here.
  const lock = StateDirLock.acquire(config.stateDir);
  try {
    return await assemble(app, config, lock, tls);
  } catch (err) {
    lock.release();
    throw err;
  }
}

async function assemble(app: FastifyInstance, config: ReturnType<typeof validateConfig>, lock: StateDirLock, tls: TlsMaterial | undefined): Promise<FastifyInstance> {
  const store = new StateStore(config.stateDir);
  await store.init();
  if (tls) await writeQemuTlsDir(store.dir('tls'), tls);
  const identity = await store.hostIdentity();
  const qemuUsers = await QemuUsers.resolve(config.qemuUser, config.qemuUids);
  if (qemuUsers.mode === 'agent' && process.getuid?.() === 0) app.log.warn(qemuUsers.description);
  else app.log.info(qemuUsers.description);
  await qemuUsers.makeReachable(config.stateDir, store.dir('run'), store.dir('tpm'));
  // KVM counts as usable only if qemu opens it as the user it will run as.
  const qemu = await probeQemu(config.qemuBinary, qemuUsers.probeCredentials());
  const accel = resolveAccel(config.accel, qemu.kvmUsable);
  const userfaultfd = await userfaultfdAccess({ qemuPrivileged: qemuUsers.mode === 'agent' && process.getuid?.() === 0, refused: config.refusePostcopy === true });
  const xmlPool = new XmlPool();
  const domains = new DomainManager({
    store,
    qemu,
    accel,
    allowPaths: config.allowPaths,
    log: app.log,
    maxDomains: config.maxDomains,
    maxLogBytes: config.maxLogBytes,
    logCheckIntervalMs: config.logCheckIntervalMs,
    qemuUsers,
    userfaultfd,
    networks: config.networks ?? {},
    graphicsListen: config.graphicsListen ?? [],
    ...(tls ? { tlsDir: store.dir('tls') } : {}),
    xmlPool,
  });
  await domains.init();
  const accelProbe = new BackgroundAccelProbe(app, config, qemu, accel);
  const migrationChannels = channelLimit(os.availableParallelism(), tls !== undefined, config.migrationChannels);
  const hostInfo = (): HostInfo => ({
    uuid: identity.uuid,
    hostname: os.hostname(),
    qemuVersion: qemu.version,
    qemuBinary: qemu.binary,
    accelerator: accel,
    kvmUsable: qemu.kvmUsable,
    firmwares: qemu.firmwares.map((d) => d.executable),
    tpmEmulator: qemu.swtpm,
    qemuUser: qemuUsers.description,
    protocolVersions: [...PROTOCOL_VERSIONS],
    machineAliases: qemu.machineAliases,
    migrationAddress: config.migrationAddress,
    migrationPorts: `${config.migrationPorts.low}-${config.migrationPorts.high}`,
    migrationChannels,
    postcopy: { receives: userfaultfd.via !== 'none', how: describeUserfaultfdAccess(userfaultfd) },
    quarantined: store.quarantined,
    accelProbe: accelProbe.report,
  });
  const migrations = new MigrationService({ config, store, domains, hostInfo, log: app.log, tls, userfaultfd });
  await migrations.init();
  app.decorate('agent', { config, store, qemu, domains, migrations, hostInfo });

  // XML or JSON only: a text/plain body is refused (415) rather than guessed at.
  app.removeContentTypeParser('text/plain');
  app.addContentTypeParser(['application/xml', 'text/xml'], { parseAs: 'string' }, (_req, body, done) => done(null, body));

  // A browser on a page of any site can be made to talk to this agent through a DNS name it
  // controls (DNS rebinding); such requests carry that name in Host. Addresses, localhost, this
  // host's name and the names given with --allowed-host are what callers and peers use.
  const allowedHosts = new Set(['localhost', os.hostname().toLowerCase(), ...config.allowedHosts.map((h) => h.toLowerCase())]);
  app.addHook('onRequest', async (req) => {
    const host = hostnameOf(req.headers.host);
    if (host === undefined || !(isIP(host) !== 0 || allowedHosts.has(host))) {
      throw new AgentError(403, 'host_not_allowed', `Host ${JSON.stringify(req.headers.host ?? '')} is not a name of this agent: use its address, or add the name with --allowed-host`);
    }
  });

  app.addHook('onRequest', async (req, reply) => {
    if (req.routeOptions.config.public) return;
    // Two credentials, two jobs: with TLS, a peer's certificate for the protocol routes and only
    // there; the operator's token for everything else (a peer's certificate opens nothing else).
    if (tls && req.routeOptions.config.peer) {
      const refusal = peerCertificateRefusal(req.raw.socket as TLSSocket);
      if (refusal) {
        throw new AgentError(401, 'peer_certificate_required', `the protocol routes answer only an agent presenting a valid certificate of this fleet's CA; ${refusal}`);
      }
      return;
    }
    if (!tokenMatches(req.headers.authorization, config.token)) {
      reply.header('www-authenticate', 'Bearer');
      throw new AgentError(401, 'unauthorized', 'a valid bearer token is required');
    }
  });

  app.setErrorHandler((err: Error & { statusCode?: number; code?: string; validation?: unknown }, req, reply) => {
    if (err instanceof AgentError) {
      const retryAfter = err.details.retryAfterSeconds;
      if (typeof retryAfter === 'number') reply.header('retry-after', String(retryAfter));
      return reply.code(err.statusCode).send({ code: err.code, message: err.message, ...err.details });
    }
    if (err.validation) return reply.code(400).send(validationError(err as FastifyError));
    const status = err.statusCode ?? 500;
    if (status >= 500) req.log.error({ err }, 'request failed');
    const code =
      status === 413 ? 'body_too_large' : status === 415 ? 'unsupported_media_type' : status < 500 ? 'invalid_request' : 'internal';
    return reply.code(status).send({ code, message: err.message });
  });
  app.setNotFoundHandler((req, reply) => reply.code(404).send({ code: 'route_not_found', message: `no route ${req.method} ${req.url}` }));

  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: {
        title: 'kvm-migrate agent',
        version,
        description: 'Per-host agent: runs qemu guests from libvirt-style domain XML and live-migrates them (protocol version 2).',
      },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
      security: [{ bearer: [] }],
    },
  });
  app.addSchema(errorSchema);
  app.addSchema(domainInfoSchema);
  app.addSchema(streamTransportSchema);
  app.addSchema(jobSchema);
  app.addSchema(fillMeasurementSchema);
  await app.register(healthRoutes);
  await app.register(hostRoutes);
  await app.register(domainRoutes);
  await app.register(migrationRoutes);
  await app.register(jobRoutes);
  await app.register(documentationRoutes);

  app.addHook('onClose', async () => {
    await accelProbe.stop();
    await migrations.close();
    await domains.close();
    await xmlPool.close();
    await store.close();
    lock.release();
  });
  return app;
}

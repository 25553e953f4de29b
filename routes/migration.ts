import type { RecoverRequest } from '../src/migration/postcopy.js';
import type { FastifyInstance } from 'fastify';
import { errorResponses } from './schemas.js';
import { MAX_DOMAIN_XML_BYTES } from './domains.js';
import { migrationOptionsSchema, peerOptionsSchema, DEFAULT_OPTIONS, type MigrationOptions } from '../src/migration/params.js';
import { FINISH_TOKEN_PATTERN, type Finish2Request, type PeerOptions, type Prepare2Request } from '../src/migration/protocol.js';
import type { ForecastOptions } from '../src/migration/forecast.js';

const migrationId = { type: 'string', pattern: '^[A-Za-z0-9_.-]{1,64}$' } as const;
const uuid = { type: 'string', pattern: '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' } as const;
const busy = { 503: { $ref: 'Error#' } } as const;

type PerformBody = { domain: string; destination: string; migrationId?: string; desturi?: string } & Partial<MigrationOptions>;

export default async function migrationRoutes(app: FastifyInstance): Promise<void> {
  const { migrations } = app.agent;
  // Long enough for any migration the caller chose to wait for; the job goes on regardless.
  const WAIT_LIMIT_MS = 6 * 3600 * 1000;

  app.post<{ Body: PerformBody; Querystring: { wait?: boolean } }>(
    '/perform',
    {
      schema: {
        summary: "Migrate a running domain to another agent (the caller's entry point, on the source)",
        tags: ['migration'],
        querystring: { type: 'object', properties: { wait: { type: 'boolean', default: false } } },
        body: {
          type: 'object',
          required: ['domain', 'destination'],
          additionalProperties: false,
          properties: {
            domain: { type: 'string', pattern: '^[A-Za-z0-9_.-]{1,64}$' },
            destination: { type: 'string', description: "the destination agent's base URL, e.g. http://hostB:7100" },
            migrationId,
            ...migrationOptionsSchema.properties,
          },
        },
        response: {
          200: { type: 'object', properties: { job: { $ref: 'Job#' } } },
          202: { type: 'object', properties: { job: { $ref: 'Job#' } } },
          ...errorResponses,
          ...busy,
        },
      },
    },
    async (req, reply) => {
      const { domain, destination, migrationId: id, desturi, ...flags } = req.body;
      const job = await migrations.perform({ domain, destination, migrationId: id, desturi, options: flags });
      if (!req.query.wait) return reply.code(202).send({ job: job.record });
      return reply.code(200).send({ job: await migrations.jobs.waitForEnd(job, WAIT_LIMIT_MS) });
    },
  );

  app.post<{ Body: { domain: string; destination?: string } & ForecastOptions }>(
    '/forecast',
    {
      schema: {
        summary: 'Before migrating: predicted total time and downtime, and whether pre-copy converges (on the source; nothing starts on the destination)',
        description:
          "Measures the guest's dirty rate for about a second (qemu's calc-dirty-rate, page sampling) and takes the stream rate " +
          'from bandwidthMiBps, or from the last completed migration to `destination`; without either, no prediction is made.',
        tags: ['migration'],
        body: {
          type: 'object',
          required: ['domain'],
          additionalProperties: false,
          properties: {
            domain: { type: 'string', pattern: '^[A-Za-z0-9_.-]{1,64}$' },
            destination: { type: 'string', description: "the destination agent's base URL: its last stream rate is used" },
            bandwidthMiBps: migrationOptionsSchema.properties.bandwidthMiBps,
            downtimeLimitMs: migrationOptionsSchema.properties.downtimeLimitMs,
            maxDowntimeMs: migrationOptionsSchema.properties.maxDowntimeMs,
            deadlineAction: migrationOptionsSchema.properties.deadlineAction,
            allowPostcopy: { type: 'boolean', description: 'as for a migration: true, false, or absent (postcopy armed where the stream would be one plain stream)' },
            completionTimeoutPerGiBSeconds: migrationOptionsSchema.properties.completionTimeoutPerGiBSeconds,
            progressTimeoutSeconds: migrationOptionsSchema.properties.progressTimeoutSeconds,
          },
        },
        response: {
          200: {
            type: 'object',
            properties: {
              domain: { type: 'string' },
              strategy: {
                type: 'object',
                description: 'what the convergence policy will end up doing',
                properties: {
                  kind: { type: 'string', enum: ['precopy', 'deadline', 'postcopy', 'progress-timeout'] },
                  downtimeLimitMs: { type: 'integer' },
                  action: { type: 'string' },
                  atMs: { type: 'integer' },
                  pauseMs: { type: 'integer' },
                  postcopyMs: { type: 'integer' },
                  predictedTotalMs: { type: 'integer' },
                  afterMs: { type: 'integer' },
                },
              },
              memoryBytes: { type: 'integer' },
              dirtyRateBytesPerSec: { type: 'integer' },
              measuredForMs: { type: 'integer' },
              streamRateBytesPerSec: { type: 'integer' },
              streamRateFrom: { type: 'string', enum: ['bandwidth-limit', 'last-migration', 'unknown'] },
              downtimeLimitMs: { type: 'integer' },
              precopy: {
                type: 'object',
                properties: {
                  converges: { type: 'boolean' },
                  iterations: { type: 'integer' },
                  predictedTotalMs: { type: 'integer' },
                  predictedDowntimeMs: { type: 'integer' },
                },
              },
              verdict: { type: 'string' },
            },
          },
          ...errorResponses,
        },
      },
    },
    async (req) => {
      const { domain, destination, ...options } = req.body;
      return migrations.forecast({ domain, ...(destination ? { destination } : {}), options });
    },
  );

  app.post<{ Body: Omit<Prepare2Request, 'options'> & { options?: Partial<PeerOptions> } }>(
    '/prepare2',
    {
      config: { peer: true },
      schema: {
        summary: 'Protocol v2 step 1 (destination): start qemu waiting for the incoming stream; answers its URI',
        tags: ['protocol'],
        body: {
          type: 'object',
          required: ['protocolVersion', 'migrationId', 'xml', 'source'],
          additionalProperties: false,
          properties: {
            protocolVersion: { type: 'integer', enum: [2] },
            migrationId,
            // The stored XML: what was defined, plus the uuid, MACs and addresses the agent filled in.
            xml: { type: 'string', maxLength: 2 * MAX_DOMAIN_XML_BYTES },
            desturi: migrationOptionsSchema.properties.desturi,
            options: peerOptionsSchema,
            transport: { $ref: 'StreamTransport#' },
            source: {
              type: 'object',
              required: ['hostUuid'],
              properties: {
                hostUuid: { type: 'string' },
                hostname: { type: 'string' },
                accelerator: { type: 'string', enum: ['kvm', 'tcg'], description: 'what the guest runs on at the source' },
              },
            },
            firmware: {
              type: 'object',
              description: "a UEFI guest's pflash sizes at the source (code, variable store): their contents travel in the stream as guest memory, so the destination must have the same sizes (409 firmware_mismatch)",
              required: ['loaderBytes'],
              additionalProperties: false,
              properties: {
                loaderBytes: { type: 'integer', minimum: 0 },
                nvramBytes: { type: 'integer', minimum: 0 },
              },
            },
          },
        },
        response: {
          200: {
            type: 'object',
            required: ['migrationId', 'uri'],
            properties: {
              migrationId: { type: 'string' },
              uri: { type: 'string' },
              destination: { type: 'object', properties: { hostUuid: { type: 'string' }, hostname: { type: 'string' } } },
              finishToken: { type: 'string', description: 'the secret Finish2 of this migration must carry' },
              transport: { $ref: 'StreamTransport#' },
            },
          },
          ...errorResponses,
          ...busy,
        },
      },
    },
    async (req) =>
      migrations.prepare2({
        ...req.body,
        source: { ...req.body.source, hostname: req.body.source.hostname ?? '' },
        options: { ...DEFAULT_OPTIONS, ...req.body.options },
      }),
  );

  app.post<{ Body: Finish2Request }>(
    '/finish2',
    {
      config: { peer: true },
      schema: {
        summary: 'Protocol v2 step 3 (destination): always sent by the source with the Perform return code',
        tags: ['protocol'],
        body: {
          type: 'object',
          required: ['migrationId', 'rc'],
          additionalProperties: false,
          properties: {
            migrationId,
            rc: { type: 'integer' },
            error: { type: 'string', maxLength: 4096 },
            cancelled: { type: 'boolean' },
            finishToken: { type: 'string', pattern: FINISH_TOKEN_PATTERN, description: "the Prepare2 answer's finishToken" },
            uuid,
          },
        },
        response: {
          200: {
            type: 'object',
            required: ['migrationId', 'outcome'],
            properties: {
              migrationId: { type: 'string' },
              outcome: { type: 'string', enum: ['finished', 'aborted'] },
              state: { type: 'string' },
              postcopy: { type: 'boolean', description: 'the stream switched to postcopy here: the guest ran here, the source copy is out of date' },
              runningForMs: { type: 'integer', minimum: 0, description: 'how long the guest had run here when this answer was made' },
              error: { type: 'object', properties: { code: { type: 'string' }, message: { type: 'string' } } },
            },
          },
          ...errorResponses,
        },
      },
    },
    async (req) => migrations.finish2(req.body),
  );

  app.post<{ Body: RecoverRequest }>(
    '/recover2',
    {
      config: { peer: true },
      schema: {
        summary: 'Postcopy recovery (destination): the source found the postcopy stream broken; this end listens anew for it to resume',
        description:
          'Breaks this end of the stream too when it has not noticed (a dead link sends nothing), then listens on a port of ' +
          'its range (migrate-recover) and answers where; the source resumes the stream there. Only with the finishToken of the ' +
          "migration's Prepare2 answer. 409 not_in_postcopy unless the migration runs in postcopy here.",
        tags: ['protocol'],
        body: {
          type: 'object',
          required: ['migrationId'],
          additionalProperties: false,
          properties: {
            migrationId,
            finishToken: { type: 'string', pattern: FINISH_TOKEN_PATTERN, description: "the Prepare2 answer's finishToken" },
          },
        },
        response: {
          200: {
            type: 'object',
            required: ['migrationId', 'uri'],
            properties: { migrationId: { type: 'string' }, uri: { type: 'string', description: 'tcp:HOST:PORT' } },
          },
          ...errorResponses,
          ...busy,
        },
      },
    },
    async (req) => migrations.recover2(req.body),
  );
}

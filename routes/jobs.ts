import type { FastifyInstance } from 'fastify';
import { errorResponses } from './schemas.js';
import { migrationOptionsSchema, type StreamTuning } from '../src/migration/params.js';

export default async function jobRoutes(app: FastifyInstance): Promise<void> {
  const { migrations } = app.agent;
  const idParams = { type: 'object', required: ['id'], properties: { id: { type: 'string', maxLength: 64 } } } as const;

  app.get(
    '/jobs',
    {
      schema: {
        summary: 'Migration jobs of this agent (both roles)',
        tags: ['jobs'],
        response: { 200: { type: 'array', items: { $ref: 'Job#' } }, 401: { $ref: 'Error#' } },
      },
    },
    async () => migrations.jobs.list().map((j) => j.record),
  );

  app.get<{ Params: { id: string } }>(
    '/jobs/:id',
    {
      schema: {
        summary: 'One migration job: phase, status, error, timings and live statistics',
        tags: ['jobs'],
        params: idParams,
        response: { 200: { $ref: 'Job#' }, ...errorResponses },
      },
    },
    async (req) => migrations.jobs.require(req.params.id).record,
  );

  app.post<{ Params: { id: string } }>(
    '/jobs/:id/cancel',
    {
      schema: {
        summary: 'Abort a running migration (source side); the guest keeps running on the source',
        tags: ['jobs'],
        params: idParams,
        response: { 202: { $ref: 'Job#' }, ...errorResponses },
      },
    },
    async (req, reply) => reply.code(202).send((await migrations.cancel(req.params.id)).record),
  );

  app.post<{ Params: { id: string }; Body: { mode?: 'postcopy' | 'pause' } | undefined }>(
    '/jobs/:id/complete',
    {
      schema: {
        summary: 'Complete a running migration now (source side): switch it to postcopy, or pause the guest so the rest copies',
        description:
          '`postcopy` (the default where the stream is set up for it: allowPostcopy, or the job\'s transport.postcopy): the guest runs on at the destination ' +
          'at once and pulls the pages it lacks from the source; from then the migration cannot be cancelled. `pause` (the ' +
          'default otherwise): the guest pauses here until the rest of its memory has copied, then runs at the destination. ' +
          'Carried out within a quarter second. Refused once the stream has completed (409 too_late_to_complete), and postcopy ' +
          'on a stream not set up for it (409 postcopy_not_allowed).',
        tags: ['jobs'],
        params: idParams,
        body: {
          type: 'object',
          additionalProperties: false,
          properties: { mode: { type: 'string', enum: ['postcopy', 'pause'] } },
        },
        response: { 202: { $ref: 'Job#' }, ...errorResponses },
      },
    },
    async (req, reply) => reply.code(202).send((await migrations.complete(req.params.id, req.body?.mode)).record),
  );

  app.post<{ Params: { id: string } }>(
    '/jobs/:id/recover',
    {
      schema: {
        summary: 'Recover a broken postcopy stream again (source side), after the agents gave up by themselves',
        description:
          'A postcopy stream that broke is recovered by the agents for postcopyRecoverySeconds (the job says so in `waiting` ' +
          'and `stats.postcopy`); after that, once the link is back, this starts a fresh round of attempts at once. Refused ' +
          'unless the job follows a postcopy stream (409 not_in_postcopy) that is broken (409 postcopy_not_broken).',
        tags: ['jobs'],
        params: idParams,
        response: { 202: { $ref: 'Job#' }, ...errorResponses },
      },
    },
    async (req, reply) => reply.code(202).send((await migrations.recoverPostcopy(req.params.id)).record),
  );

  app.patch<{ Params: { id: string }; Body: StreamTuning }>(
    '/jobs/:id',
    {
      schema: {
        summary: "Change a running migration's stream limits (source side): bandwidth, downtime limit",
        description:
          'Applied to qemu at once while the stream runs, and kept in the job\'s options for the rest of it. Refused once the ' +
          'stream has completed (409 too_late_to_tune) and on the destination side.',
        tags: ['jobs'],
        params: idParams,
        body: {
          type: 'object',
          additionalProperties: false,
          minProperties: 1,
          properties: {
            bandwidthMiBps: migrationOptionsSchema.properties.bandwidthMiBps,
            downtimeLimitMs: migrationOptionsSchema.properties.downtimeLimitMs,
          },
        },
        response: { 200: { $ref: 'Job#' }, ...errorResponses },
      },
    },
    async (req) => (await migrations.tune(req.params.id, req.body)).record,
  );

  app.post<{ Params: { id: string }; Body: { outcome: 'finished' | 'aborted'; reason: string } }>(
    '/jobs/:id/resolve',
    {
      schema: {
        summary: 'Decide a source job whose Finish2 outcome stays unknown (destination unreachable; the guest paused here)',
        description:
          'For an operator who has checked the destination host: `finished` when the guest runs there (the paused copy here ' +
          'is ended), `aborted` when it does not (the guest resumes here). Refused unless the job is waiting for Finish2. ' +
          'In postcopy: `finished` once its stream completed, `aborted` once its recovery gave up (the guest is given up, the copy here is not resumed). ' +
          'A wrong decision means two running copies or none: check first.',
        tags: ['jobs'],
        params: idParams,
        body: {
          type: 'object',
          required: ['outcome', 'reason'],
          additionalProperties: false,
          properties: {
            outcome: { type: 'string', enum: ['finished', 'aborted'] },
            reason: { type: 'string', minLength: 1, maxLength: 1024, description: 'what the operator checked, kept in the job record' },
          },
        },
        response: { 200: { $ref: 'Job#' }, ...errorResponses },
      },
    },
    async (req) => (await migrations.resolve(req.params.id, req.body.outcome, req.body.reason)).record,
  );
}

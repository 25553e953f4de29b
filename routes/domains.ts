import type { FastifyInstance } from 'fastify';
import { domainNameParams, errorResponses } from './schemas.js';

interface NameParams {
  name: string;
}

/** The largest domain XML a caller may define (Prepare2 carries the stored form, which may be larger). */
export const MAX_DOMAIN_XML_BYTES = 256 * 1024;

export default async function domainRoutes(app: FastifyInstance): Promise<void> {
  const { domains } = app.agent;
  const one = { 200: { $ref: 'DomainInfo#' }, ...errorResponses } as const;

  app.post<{ Body: string }>(
    '/domains',
    {
      // Real domain XML is a few KiB; the bound also bounds a parse's work (in a worker thread: src/agent/xml-pool.ts).
      bodyLimit: Math.min(app.agent.config.bodyLimitBytes, MAX_DOMAIN_XML_BYTES),
      schema: {
        summary: 'Define (or redefine, while shut off) a domain from libvirt-style domain XML',
        tags: ['domains'],
        consumes: ['application/xml', 'text/xml'],
        body: { type: 'string', description: 'libvirt-style <domain> XML' },
        response: { 201: { $ref: 'DomainInfo#' }, ...errorResponses, 413: { $ref: 'Error#' }, 415: { $ref: 'Error#' }, 503: { $ref: 'Error#' } },
      },
    },
    async (req, reply) => {
      const entry = await domains.define(req.body);
      return reply.code(201).send(await domains.info(entry));
    },
  );

  app.get(
    '/domains',
    {
      schema: {
        summary: 'All domains of this host with their state',
        tags: ['domains'],
        response: { 200: { type: 'array', items: { $ref: 'DomainInfo#' } }, 401: { $ref: 'Error#' } },
      },
    },
    async () => Promise.all(domains.list().map((entry) => domains.info(entry))),
  );

  app.get<{ Params: NameParams }>(
    '/domains/:name',
    { schema: { summary: 'One domain with its state as qemu reports it', tags: ['domains'], params: domainNameParams, response: one } },
    async (req) => domains.info(domains.get(req.params.name)),
  );

  app.get<{ Params: NameParams }>(
    '/domains/:name/xml',
    {
      schema: {
        summary: 'The stored domain XML (machine type resolved, MACs and uuid filled in)',
        tags: ['domains'],
        params: domainNameParams,
        produces: ['application/xml'],
        response: { 200: { type: 'string' }, ...errorResponses },
      },
    },
    async (req, reply) => reply.type('application/xml').send(domains.get(req.params.name).xml),
  );

  const lifecycle = [
    { verb: 'start', summary: 'Start a defined domain', status: 200, run: (n: string) => domains.start(n) },
    { verb: 'shutdown', summary: 'Ask the guest to power off (ACPI); the state changes when it does', status: 202, run: (n: string) => domains.shutdown(n) },
    { verb: 'suspend', summary: "Pause the guest's vCPUs", status: 200, run: (n: string) => domains.suspend(n) },
    { verb: 'resume', summary: 'Resume a paused guest (also one that arrived paused)', status: 200, run: (n: string) => domains.resume(n) },
    { verb: 'destroy', summary: 'Stop the domain at once (ends its qemu)', status: 200, run: (n: string) => domains.destroy(n) },
  ] as const;
  for (const { verb, summary, status, run } of lifecycle) {
    app.post<{ Params: NameParams }>(
      `/domains/:name/${verb}`,
      {
        schema: {
          summary,
          tags: ['domains'],
          params: domainNameParams,
          // 503 domain_unreachable: its qemu runs, but its monitor does not answer yet.
          response: { [status]: { $ref: 'DomainInfo#' }, ...errorResponses, 503: { $ref: 'Error#' } },
        },
      },
      async (req, reply) => reply.code(status).send(await domains.info(await run(req.params.name))),
    );
  }

  app.delete<{ Params: NameParams }>(
    '/domains/:name',
    {
      schema: {
        summary: 'Undefine a domain (refused while it runs)',
        tags: ['domains'],
        params: domainNameParams,
        response: { 204: { type: 'null' }, ...errorResponses, 503: { $ref: 'Error#' } },
      },
    },
    async (req, reply) => {
      await domains.undefine(req.params.name);
      return reply.code(204).send();
    },
  );
}

import type { FastifyInstance } from 'fastify';

export default async function documentationRoutes(app: FastifyInstance): Promise<void> {
  app.get(
    '/documentation/json',
    { schema: { hide: true } },
    async () => app.swagger(),
  );
}

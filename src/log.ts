/**
 * The logging the agent's core needs: an object of fields, then the message (pino's shape, which
 * Fastify's logger has). The core depends on this, not on Fastify, so it runs under any logger.
 */
export interface Logger {
  debug(fields: object, message?: string): void;
  info(fields: object, message?: string): void;
  warn(fields: object, message?: string): void;
  error(fields: object, message?: string): void;
}

/**
 * Every refusal the agent makes is an AgentError: a stable machine-readable `code`, the HTTP
 * status that fits, a human message and optional details. Routes turn it into `{code, message, ...}`.
 */
export class AgentError extends Error {
  readonly code: string;
  readonly statusCode: number;
  readonly details: Record<string, unknown>;

  constructor(statusCode: number, code: string, message: string, details: Record<string, unknown> = {}) {
    super(message);
    this.name = 'AgentError';
    this.statusCode = statusCode;
    this.code = code;
    this.details = details;
  }
}

export const badRequest = (code: string, message: string, details?: Record<string, unknown>) =>
  new AgentError(400, code, message, details);
export const notFound = (code: string, message: string, details?: Record<string, unknown>) =>
  new AgentError(404, code, message, details);
export const conflict = (code: string, message: string, details?: Record<string, unknown>) =>
  new AgentError(409, code, message, details);

/** Refusal of domain XML: names the element (an XPath-like path) that could not be honoured. */
export class DomainXmlError extends AgentError {
  readonly element: string;
  constructor(code: string, element: string, message: string) {
    super(400, code, message, { element });
    this.name = 'DomainXmlError';
    this.element = element;
  }
}

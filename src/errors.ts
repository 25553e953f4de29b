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

/** One element of domain XML that cannot be honoured, and why. */
export interface XmlBlocker {
  code: string;
  element: string;
  message: string;
}

/**
 * Refusal of domain XML: names the element (an XPath-like path) that could not be honoured.
 * `errors` lists every blocker found in one pass (this one first), so a user learns all of them
 * from one answer; the top-level code, element and message are the first's.
 */
export class DomainXmlError extends AgentError {
  readonly element: string;
  readonly errors: XmlBlocker[];
  constructor(code: string, element: string, message: string, more: XmlBlocker[] = []) {
    const errors = [{ code, element, message }, ...more];
    super(400, code, more.length > 0 ? `${message} (and ${more.length} more: see errors)` : message, { element, errors });
    this.name = 'DomainXmlError';
    this.element = element;
    this.errors = errors;
  }

  static of(blockers: XmlBlocker[]): DomainXmlError {
    const [first, ...more] = blockers;
    return new DomainXmlError(first!.code, first!.element, first!.message, more);
  }
}

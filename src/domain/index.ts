/** Domain XML -> validated model -> qemu argv. Every function here is pure and deterministic. */
export type * from './model.js';
export { parseDomainXml } from './parse.js';
export { normalizeDomainXml } from './normalize.js';
export { buildArgv, effectiveAccel, escapeOptionValue } from './argv.js';
export { domainFileRefs } from './refs.js';
export { unitToBytes, scaledToBytes, bytesToKiBCeil, kibRoundUpToMiB } from './units.js';

// XmlPool's worker whose start-up never ends: its module never finishes loading (the thread
// stays alive, so Piscina never hears of it again).
setInterval(() => undefined, 60_000);
await new Promise<never>(() => undefined);

export default function never(): never {
  throw new Error('never reached');
}

/** Numbers as the panel shows them: short, with units. */

/** Dollars: cents when large, two significant digits for the tiny costs of seconds. */
export function money(x: number | null | undefined): string {
  if (x === null || x === undefined || !isFinite(x)) {
    return '-';
  }
  if (x === 0) {
    return '$0';
  }
  if (x >= 1) {
    return `$${x.toFixed(2)}`;
  }
  if (x >= 0.01) {
    return `$${x.toFixed(3)}`;
  }
  // 0.00076 -> "$0.00076", 0.000001 -> "$0.000001"
  const t = x.toPrecision(2);
  return t.includes('e') ? `$${x.toFixed(8)}` : `$${t.replace(/(\.\d*?)0+$/, '$1')}`;
}

/** Milliseconds: "850 ms", "2.4 s". */
export function ms(x: number | null | undefined): string {
  if (x === null || x === undefined) {
    return '-';
  }
  return x < 1000 ? `${Math.round(x)} ms` : `${(x / 1000).toFixed(1)} s`;
}

/** Seconds as a countdown: "45 s", "3:05". */
export function secs(x: number): string {
  const s = Math.ceil(x);
  if (s < 60) {
    return `${s} s`;
  }
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

/** Bytes: "12 kB", "1.2 MB". */
export function bytes(x: number): string {
  if (x < 1e3) {
    return `${x} B`;
  }
  if (x < 1e6) {
    return `${Math.round(x / 1e3)} kB`;
  }
  if (x < 1e9) {
    return `${(x / 1e6).toFixed(1)} MB`;
  }
  return `${(x / 1e9).toFixed(1)} GB`;
}

/** What a cold-starting worker is doing. */
export const PHASES: Record<string, string> = {
  environment: 'building the environment',
  process: 'starting the process',
  code: 'loading the code'
};

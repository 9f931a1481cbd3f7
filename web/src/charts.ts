// A live uPlot chart whose set of lines can change (a new event type, a new
// histogram): it is rebuilt when the keys change and updated in place otherwise.

import uPlot from "uplot";
import type { ChartData } from "./metrics-model";

/** Line colours, reused in order. */
const PALETTE = [
  "#2f6fde",
  "#e0672b",
  "#1a7f37",
  "#b4308a",
  "#9a6700",
  "#0f8b8d",
  "#7048e8",
  "#c62828",
  "#5f6b7a",
  "#3c9d3c",
];

export interface ChartOptions {
  /** Unit shown on the y axis ("events/s", "ms"). */
  unit: string;
  /** Decimal places in the legend. */
  decimals?: number;
  /** Height in CSS pixels (default 220). */
  height?: number;
  /** The colour group of a key (same group, same colour); default: the key. */
  group?: (key: string) => string;
  /** Dashed lines for these keys. */
  dashed?: (key: string) => boolean;
  /** Whether a line joins points across nulls (default false: gaps stay). */
  spanGaps?: boolean;
  /** The legend's label of a key (default: the key). */
  label?: (key: string) => string;
  /** Whether the legend shows the value under the cursor (default true). */
  liveLegend?: boolean;
}

export class LiveChart {
  private plot?: uPlot;
  private keys = "";
  private readonly colours = new Map<string, string>();

  constructor(
    private readonly container: HTMLElement,
    private readonly options: ChartOptions,
  ) {
    new ResizeObserver(() => this.plot?.setSize(this.size())).observe(container);
  }

  /** Draws `data`; rebuilds the chart when its lines changed. */
  update(data: ChartData): void {
    const keys = data.keys.join("\n");
    const aligned = data.columns as unknown as uPlot.AlignedData;
    if (this.plot && keys === this.keys) {
      this.plot.setData(aligned);
      return;
    }
    this.plot?.destroy();
    this.keys = keys;
    this.plot = new uPlot(this.config(data.keys), aligned, this.container);
  }

  private size(): { width: number; height: number } {
    return { width: Math.max(200, this.container.clientWidth), height: this.options.height ?? 220 };
  }

  private colour(key: string): string {
    const group = this.options.group ? this.options.group(key) : key;
    let colour = this.colours.get(group);
    if (!colour) {
      colour = PALETTE[this.colours.size % PALETTE.length] ?? "#2f6fde";
      this.colours.set(group, colour);
    }
    return colour;
  }

  private config(keys: string[]): uPlot.Options {
    const style = getComputedStyle(document.documentElement);
    const fg = style.getPropertyValue("--muted").trim() || "#667085";
    const grid = style.getPropertyValue("--line").trim() || "#e3e6eb";
    const decimals = this.options.decimals ?? 1;
    const { unit } = this.options;
    const axis: uPlot.Axis = { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
    return {
      ...this.size(),
      cursor: { drag: { x: false, y: false } },
      legend: { live: this.options.liveLegend ?? true },
      scales: {
        x: { time: true },
        // From 0 (or below), with some room on top; [0, 1] while there is no data.
        y: { range: (_u, min, max) => [Math.min(0, min ?? 0), Math.max(1, (max ?? 0) * 1.1)] },
      },
      axes: [axis, { ...axis, label: unit, size: 60, values: (_u, ticks) => ticks.map((t) => fmt(t)) }],
      series: [
        {},
        ...keys.map(
          (key): uPlot.Series => ({
            label: this.options.label ? this.options.label(key) : key,
            stroke: this.colour(key),
            width: 2,
            spanGaps: this.options.spanGaps ?? false,
            points: { show: true, size: 5 },
            value: (_u, v) => (v === null || v === undefined ? "–" : `${v.toFixed(decimals)} ${unit}`),
            ...(this.options.dashed?.(key) ? { dash: [6, 4] } : {}),
          }),
        ),
      ],
    };
  }
}

/** A compact number: 1234 -> "1.2k". */
export function fmt(n: number): string {
  const a = Math.abs(n);
  if (a >= 1e9) return `${(n / 1e9).toFixed(1)}G`;
  if (a >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (a >= 1e4) return `${(n / 1e3).toFixed(1)}k`;
  if (Number.isInteger(n)) return String(n);
  return a >= 100 ? n.toFixed(0) : a >= 1 ? n.toFixed(1) : n.toFixed(2);
}

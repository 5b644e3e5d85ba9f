/** The Flash icon: a lightning bolt, coloured by the theme. */
import { LabIcon } from '@jupyterlab/ui-components';

const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <path class="jp-icon3" fill="#616161" d="M13.5 2 4.5 13.5h6L9.5 22l9-11.5h-6z"/>
</svg>`;

export const flashIcon = new LabIcon({ name: 'flash-jupyter:flash', svgstr: svg });

/**
 * The sidebar's icon: a chip with its pins, filled like JupyterLab's own icons
 * (class jp-icon3) so that it follows the theme.
 */
import { LabIcon } from '@jupyterlab/ui-components';

const svgstr = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M7 5h10a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H7a2 2 0 0 1-2-2V7a2 2 0 0 1 2-2zm1 3v8h8V8H8z"/>
    <rect x="10" y="10" width="4" height="4"/>
    <path d="M8.5 1.5h1.5v3H8.5zm5.5 0h1.5v3H14zM8.5 19.5h1.5v3H8.5zm5.5 0h1.5v3H14zM1.5 8.5h3V10h-3zm0 5.5h3v1.5h-3zM19.5 8.5h3V10h-3zm0 5.5h3v1.5h-3z"/>
  </g>
</svg>`;

export const devicesIcon = new LabIcon({
  name: 'jupyterlab-rpc-workbench:devices',
  svgstr
});

/**
 * C highlighting of `%%rpc_compile` cells.
 *
 * A code cell's editor takes its language from the cell model's `mimeType`.
 * We watch every code cell of a notebook: when its source starts with
 * `%%rpc_compile` its mimeType becomes `text/x-csrc` (and goes back to the
 * notebook's when it no longer does). The notebook sets every code cell's
 * mimeType itself (a cell inserted or moved, the kernel's language known): we
 * put C back each time it does. An editor applies the languages it is given
 * in the order they finish loading, not the order they were asked for, so C
 * is set only once both it and the language it replaces have loaded: then it
 * is the last one applied. Such cells get the class `wb-c-cell`.
 *
 * JupyterLab's highlight style has no colour for types (`int`), so every
 * editor also gets @lezer/highlight's class highlighter, which names tokens
 * by their role (`tok-keyword`, `tok-typeName`, ...); style/base.css colours
 * the types of C cells with the theme's variable-3 colour.
 */
import { ICellModel } from '@jupyterlab/cells';
import {
  EditorExtensionRegistry,
  IEditorExtensionRegistry,
  IEditorLanguageRegistry
} from '@jupyterlab/codemirror';
import { Notebook } from '@jupyterlab/notebook';
import { syntaxHighlighting } from '@codemirror/language';
import { classHighlighter } from '@lezer/highlight';

export const C_MIME = 'text/x-csrc';
export const C_CELL_CLASS = 'wb-c-cell';

/** IPython runs a cell as `%%rpc_compile` when that is its first line, past blank lines and indentation. */
const RPC_COMPILE = /^\s*%%rpc_compile(\s|$)/;

export function isRpcCompileSource(source: string): boolean {
  return RPC_COMPILE.test(source);
}

/** Role-named token classes (`tok-*`) in every CodeMirror editor. */
export function addTokenClasses(registry: IEditorExtensionRegistry): void {
  registry.addExtension({
    name: 'jupyterlab-rpc-workbench:token-classes',
    factory: () =>
      EditorExtensionRegistry.createImmutableExtension(
        syntaxHighlighting(classHighlighter)
      )
  });
}

/** Keep the language of a notebook's `%%rpc_compile` cells C. */
export function watchNotebook(
  notebook: Notebook,
  languages: IEditorLanguageRegistry
): void {
  const watched = new WeakSet<ICellModel>();
  const watchCell = (cell: ICellModel) => {
    if (cell.type !== 'code' || watched.has(cell)) {
      return;
    }
    watched.add(cell);
    cell.contentChanged.connect(() => void sync(notebook, cell, languages));
    cell.mimeTypeChanged.connect(() => void sync(notebook, cell, languages));
    void sync(notebook, cell, languages);
  };
  const watchModel = () => {
    const model = notebook.model;
    if (!model) {
      return;
    }
    for (const cell of model.cells) {
      watchCell(cell);
    }
    model.cells.changed.connect((_, args) => args.newValues.forEach(watchCell));
  };
  notebook.modelChanged.connect(watchModel);
  watchModel();
}

async function sync(
  notebook: Notebook,
  cell: ICellModel,
  languages: IEditorLanguageRegistry
): Promise<void> {
  const isC = () =>
    !cell.isDisposed && isRpcCompileSource(cell.sharedModel.getSource());
  if (isC() && cell.mimeType !== C_MIME) {
    await Promise.all([
      languages.getLanguage(C_MIME),
      languages.getLanguage(cell.mimeType)
    ]);
    if (isC() && cell.mimeType !== C_MIME) {
      cell.mimeType = C_MIME;
    }
  } else if (!isC() && !cell.isDisposed && cell.mimeType === C_MIME) {
    cell.mimeType = notebook.codeMimetype;
  }
  notebook.widgets
    .find(widget => widget.model === cell)
    ?.toggleClass(C_CELL_CLASS, isC());
}

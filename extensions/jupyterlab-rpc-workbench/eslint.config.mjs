// ESLint's recommended rules and typescript-eslint's, with a few of our own:
// strict equality, braces, and no innerHTML (peer strings go into the DOM as text).
import js from '@eslint/js';
import { defineConfig } from 'eslint/config';
import tseslint from 'typescript-eslint';

export default defineConfig(
  { ignores: ['lib/', 'labextension/', 'node_modules/'] },
  js.configs.recommended,
  tseslint.configs.recommended,
  {
    files: ['src/**/*.ts'],
    rules: {
      eqeqeq: 'error',
      curly: 'error',
      'no-restricted-properties': [
        'error',
        {
          property: 'innerHTML',
          message: 'Put peer strings in the DOM as textContent.'
        },
        {
          property: 'outerHTML',
          message: 'Put peer strings in the DOM as textContent.'
        }
      ]
    }
  }
);

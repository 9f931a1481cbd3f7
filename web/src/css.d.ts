// Style sheets imported for their side effect; esbuild bundles them into a .css
// file next to the page's script.
declare module "*.css";

"""The version-update benchmark: PTFS vs CPT vs path switching (decay branches and WSM merges)."""

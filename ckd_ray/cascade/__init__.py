"""The cascade: the plan of steps, the runs that carry it out on Ray (teacher pools, the student worker
group, the manifest), the shared prepared teachers and the comparison experiment."""
